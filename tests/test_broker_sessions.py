"""Session store, retained store, lifecycle bookkeeping and the settings catalogue (no network)."""

from __future__ import annotations

import dataclasses
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.emulator import lifecycle
from harness.emulator.broker_settings import BrokerSettings, describe_guesses, guesses_markdown
from harness.emulator.lifecycle import DisconnectReason, VersionNumbers
from harness.emulator.mqtt.sessions import (
    Delivery,
    Message,
    RetainedStore,
    SessionStore,
    SubscriptionOptions,
)
from harness.emulator.mqtt.topics import topic_matches


def test_version_number_is_shared_by_a_connection_and_grows_across_connections() -> None:
    # spec broker §4.2: connect and its disconnect share one value; monotonically increasing
    v = VersionNumbers(reset_after=3600)
    first = v.begin("c", 0.0)
    v.end("c", first, 10.0)
    second = v.begin("c", 20.0)
    assert second > first
    taken_over = v.begin("c", 21.0)  # a takeover while `second` is live
    v.end("c", second, 22.0)  # the old connection's end does not disturb the new one
    assert v.begin("c", 23.0) > taken_over


def test_version_number_resets_after_an_hour_disconnected_or_session_expiry() -> None:
    # spec broker §4.2: resets to 0 after ~1 h disconnected (or persistent-session expiry)
    v = VersionNumbers(reset_after=3600)
    v.end("c", v.begin("c", 0.0), 1.0)
    assert v.begin("c", 3700.0) == 0
    v.end("c", 0, 3701.0)
    v.begin("d", 0.0)
    v.end("d", 0, 1.0)
    v.forget("d")
    assert v.begin("d", 2.0) == 0


def test_lifecycle_disconnected_payload_has_no_ip_and_carries_the_reason() -> None:
    # spec broker §4.2
    event = lifecycle.disconnected("c", timestamp_ms=1, session_identifier="s",
                                   principal_identifier="p", version_number=3,
                                   client_initiated=False, reason=DisconnectReason.AUTH_ERROR,
                                   thing_name="t")
    payload = json.loads(event.to_bytes())
    assert event.topic == "$aws/events/presence/disconnected/c"
    assert "ipAddress" not in payload and payload["thingName"] == "t"
    assert payload["disconnectReason"] == "AUTH_ERROR"


def test_only_client_initiated_disconnect_keeps_the_will() -> None:
    # spec broker §4.2 "Will sent" column
    fires = {r for r in DisconnectReason if r.fires_will}
    assert fires == set(DisconnectReason) - {DisconnectReason.CLIENT_INITIATED_DISCONNECT}


def test_retained_store_replaces_deletes_and_expires() -> None:
    # spec broker §1.6 (one per topic, zero bytes delete, MQTT 5 expiry applies)
    store = RetainedStore()
    store.apply(Message("t", b"1", retain=True), 0.0)
    store.apply(Message("t", b"2", retain=True), 1.0)
    stored = store.get("t", 2.0)
    assert stored is not None and stored.message.payload == b"2"
    store.apply(Message("t", b"", retain=True), 3.0)
    assert store.get("t", 3.0) is None
    store.apply(Message("u", b"x", retain=True, expires_at=10.0), 0.0)
    assert store.get("u", 9.9) is not None and store.get("u", 10.0) is None


def test_store_routes_each_session_once_with_its_highest_qos() -> None:
    # MQTT 5 overlapping subscriptions: one delivery, the highest granted QoS
    store = SessionStore()
    s, _ = store.open("c", 5, clean_start=True, expiry_interval=0, now=0.0)
    store.subscribe(s, "a/+", SubscriptionOptions(0))
    store.subscribe(s, "a/#", SubscriptionOptions(1))
    routed = store.route("a/b")
    assert [(x.client_id, o.qos) for x, o in routed] == [("c", 1)]


def test_persistent_session_survives_detach_until_it_expires() -> None:
    # spec broker §1.3
    store = SessionStore()
    s, present = store.open("p", 4, clean_start=False, expiry_interval=60, now=0.0)
    assert not present
    store.subscribe(s, "x", SubscriptionOptions(1))
    assert store.detach(s, 100.0)
    s.store(s.backlog, Delivery(Message("x", b"1", 1), 1), 10)
    assert store.expire(159.9) == []
    resumed, present = store.open("p", 4, clean_start=False, expiry_interval=60, now=159.9)
    assert present and resumed is s and len(s.backlog) == 1
    store.detach(s, 200.0)
    assert store.expire(260.0) == [s]
    assert store.route("x") == []


def test_offline_storage_is_bounded() -> None:
    # spec broker §1.3: storage bounded; excess dropped
    store = SessionStore()
    s, _ = store.open("b", 4, clean_start=False, expiry_interval=60, now=0.0)
    store.detach(s, 0.0)
    kept = [s.store(s.backlog, Delivery(Message("x", b""), 1), 3) for _ in range(5)]
    assert kept == [True, True, True, False, False]


@given(st.lists(st.tuples(st.sampled_from(["c1", "c2", "c3"]),
                          st.sampled_from(["a/b", "a/+", "a/#", "#", "+/b", "$share/g/a/b",
                                           "$share/h/a/#"]),
                          st.integers(min_value=0, max_value=1)), max_size=12),
       st.sampled_from(["a/b", "a/c", "b", "a/b/c"]))
@settings(max_examples=60, deadline=None)
def test_route_agrees_with_brute_force_matching(subs: list[tuple[str, str, int]],
                                                topic: str) -> None:
    # plain subscriptions: every matching session once; each share group: exactly one member
    store = SessionStore(rng=random.Random(1))
    for client_id, topic_filter, qos in subs:
        session = store.sessions.get(client_id) or store.open(
            client_id, 5, clean_start=True, expiry_interval=0, now=0.0)[0]
        session.connection = object()
        store.subscribe(session, topic_filter, SubscriptionOptions(qos))
    routed = [s.client_id for s, _ in store.route(topic)]
    sessions = {cid: store.sessions[cid] for cid, _, _ in subs}
    plain = {cid for cid, s in sessions.items()
             if any(topic_matches(f, topic) for f in s.subscriptions if not f.startswith("$"))}
    groups = {f.split("/")[1] for s in sessions.values() for f in s.subscriptions
              if f.startswith("$share/") and topic_matches(f, topic)}
    assert len(routed) == len(plain) + len(groups)
    assert plain <= set(routed)


def test_every_guess_is_documented_and_rendered_for_the_readme() -> None:
    # spec conventions: every UNCONFIRMED default is a named, documented setting
    guesses = describe_guesses()
    names = {g.name for g in guesses}
    assert {"explain_refusals", "refuse_certificates_at", "denied_subscribe_disconnects_311",
            "subscribe_qos2_5", "receive_maximum"} <= names
    assert all(g.text and g.spec for g in guesses)
    table = guesses_markdown()
    assert table.count("\n") == len(guesses) + 1
    assert "`--explain-refusals`" not in table and guesses[0].flag.startswith("--")
    fields = {f.name for f in dataclasses.fields(BrokerSettings)}
    assert names <= fields
