"""Every limit of the emulated broker and every choice made where AWS is silent.

AWS documents its quotas but not every reaction to breaking them; the spec
(iot-broker-and-policy.md) marks those points UNCONFIRMED and recommends a
default. Each such point is a named field here, so a test or a firmware team
can flip it (``BrokerSettings(explain_refusals=True)``) and :func:`describe_guesses`
lists them for the README (``python -m harness.emulator.broker_settings``).

A field is a *guess* when its metadata carries ``guess``; the other fields are
AWS's documented quotas (defaults = AWS's defaults) or emulator robustness knobs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class RefusalPoint(str, Enum):
    """When a certificate that is not admissible is turned away (spec §2.3)."""

    CONNECT = "connect"  # handshake completes; the CONNECT gets no CONNACK (3.1.1) / 0x87 (5)
    HANDSHAKE = "handshake"  # closed right after the TLS handshake, before any MQTT byte


class Qos2Subscribe(str, Enum):
    """Reaction to a SUBSCRIBE asking for QoS 2 (spec §1.4)."""

    DISCONNECT = "disconnect"  # close the connection (lifecycle CLIENT_ERROR)
    DOWNGRADE = "downgrade"  # grant QoS 1 in the SUBACK


def _guess(default: Any, spec: str, text: str) -> Any:
    """A field whose default is the spec's recommendation for an UNCONFIRMED behaviour."""
    return field(default=default, metadata={"guess": text, "spec": spec})


def _quota(default: Any, spec: str, text: str) -> Any:
    """A field holding one of AWS's documented limits (the default is AWS's)."""
    return field(default=default, metadata={"quota": text, "spec": spec})


def _knob(default: Any, text: str) -> Any:
    """An emulator-only robustness or speed knob (not an AWS behaviour)."""
    return field(default=default, metadata={"knob": text})


@dataclass(frozen=True)
class BrokerSettings:
    """Limits and switches of one :class:`~harness.emulator.mqtt.server.Broker`."""

    # -- AWS quotas (spec §1.8) ----------------------------------------------------------------
    max_client_id_bytes: int = _quota(128, "§1.3", "client id length in UTF-8 bytes")
    max_payload_bytes: int = _quota(128 * 1024, "§1.8", "PUBLISH payload (and Will) bytes")
    max_topic_bytes: int = _quota(256, "§1.5", "topic name / filter bytes")
    max_topic_slashes: int = _quota(7, "§1.5", "slashes in a topic name / filter")
    max_filters_per_subscribe: int = _quota(8, "§1.8", "topic filters in one SUBSCRIBE")
    max_subscriptions_per_connection: int = _quota(50, "§1.8", "subscriptions per connection")
    max_inflight_outbound: int = _quota(100, "§1.4", "unacknowledged QoS 1 messages to a client")
    keep_alive_min: int = _quota(30, "§1.3", "keep-alive floor in seconds (1-29 → this)")
    keep_alive_max: int = _quota(1200, "§1.3", "keep-alive ceiling in seconds (0 or more → this)")
    keep_alive_grace: float = _quota(1.5, "§1.3", "disconnect after this many keep-alives of "
                                     "silence")
    persistent_session_expiry: int = _quota(3600, "§1.3", "account quota 'Persistent session "
                                            "expiry period' in seconds (adjustable to 604800)")
    topic_alias_maximum: int = _quota(8, "§1.7", "MQTT 5 topic aliases per connection")
    message_expiry_max: int = _quota(604800, "§1.7", "MQTT 5 Message Expiry Interval ceiling")
    qos1_retry_window: float = _quota(3600.0, "§1.4", "unacknowledged outbound QoS 1 messages "
                                      "are retried (on reconnect) this long, then dropped")
    backlog_delivery_rate: float | None = _quota(
        10.0, "§1.3", "messages/s at which a resumed session's offline backlog is delivered "
        "(None: at once)")
    connect_rate_per_client_id: float | None = _quota(
        1.0, "§1.8", "CONNECTs per second per client id, measured on the shared Clock "
        "(None: unlimited)")
    publish_rate_per_connection: float | None = _quota(
        100.0, "§1.8", "inbound PUBLISHes per second per connection; excess discarded "
        "(None: unlimited)")

    # -- values AWS does not state --------------------------------------------------------------
    receive_maximum: int = _guess(
        100, "§1.7", "MQTT 5 CONNACK Receive Maximum = the 100 inbound unacknowledged QoS 1 "
        "quota")
    max_packet_bytes: int = _guess(
        128 * 1024 + 4096, "§1.7", "largest packet accepted and the MQTT 5 CONNACK Maximum "
        "Packet Size: the 128 KB payload plus 4 KiB for topic and properties")
    max_offline_messages: int = _guess(
        1000, "§1.3", "QoS 1 messages stored per offline persistent session; the rest dropped")
    account_connect_rate: float | None = _guess(
        None, "§1.8", "account-wide CONNECTs per second (AWS default 500, adjustable); off so "
        "load tests measure the emulator, set it to reproduce THROTTLED")

    # -- refused CONNECTs ----------------------------------------------------------------------
    explain_refusals: bool = _guess(
        False, "§1.9", "off = AWS: a refused 3.1.1 CONNECT is closed without CONNACK; on = "
        "emulator aid: it gets a CONNACK return code saying why (5 not authorized, 2 identifier "
        "rejected, 1 unacceptable version, 3 throttled)")
    refuse_certificates_at: RefusalPoint = _guess(  # noqa: RUF009
        RefusalPoint.CONNECT, "§2.3", "an unregistered, INACTIVE or REVOKED certificate that "
        "chains to a trust anchor completes the TLS handshake and is refused at CONNECT "
        "('handshake' closes right after the handshake; Python's ssl cannot fail the handshake "
        "itself for a chaining certificate). Certificates chaining to no anchor always fail the "
        "handshake")
    reject_expired_certificates: bool = _guess(
        True, "§2.3", "expired device certificates fail the TLS handshake")
    connect_failed_for_refused_certificates: bool = _guess(
        False, "§4.1", "a refused certificate (not a refused policy) emits no connect_failed "
        "lifecycle event: connect_failed is documented for authorization failures only")
    will_denied_emits_connect_failed: bool = _guess(
        True, "§1.3", "a CONNECT refused because its Will topic is not authorized emits "
        "connect_failed")
    mqtt31_refused: bool = _guess(
        True, "§1.1", "MQTT 3.1 (protocol level 3) is unsupported: the connection is closed")
    assign_client_id_311: bool = _guess(
        True, "§1.3", "3.1.1 empty client id: accepted with cleanSession=1 (an id $GEN/<uuid> "
        "is assigned), CONNACK 2 with cleanSession=0; off: always CONNACK 2")
    connect_throttle_reason_code: int = _guess(
        0x97, "§1.8", "MQTT 5 CONNACK for a CONNECT over the per-client-id rate (3.1.1: close)")

    # -- SNI / ALPN ------------------------------------------------------------------------------
    require_sni: bool = _guess(
        False, "§1.2", "DEFAULT-mode certificates may connect without SNI (SNI_ONLY ones never "
        "can); on = strict, as the MQTT page still says")
    sni_host_names: tuple[str, ...] = _guess(
        (), "§1.2", "host names SNI must name when sent (empty: any name is the endpoint)")
    require_alpn: bool = _guess(
        False, "§1.2", "the single port behaves as 8883 and 443+ALPN x-amzn-mqtt-ca together: "
        "no ALPN or x-amzn-mqtt-ca are both accepted; on = behave as port 443 only")

    # -- keep-alive and sessions -----------------------------------------------------------------
    unsubscribe_resets_keep_alive: bool = _guess(
        True, "§1.3", "UNSUBSCRIBE resets the keep-alive timer like PUBLISH, SUBSCRIBE, PINGREQ "
        "and PUBACK")
    server_keep_alive_only_when_changed: bool = _guess(
        True, "§1.3", "MQTT 5 CONNACK carries Server Keep Alive only when the value used differs "
        "from the one requested")
    session_expiry_slack: float = _guess(
        0.0, "§1.3", "persistent sessions expire exactly (AWS may be up to 30 min late); "
        "seconds added to every expiry")
    session_identifier_survives_resume: bool = _guess(
        True, "§4.2", "sessionIdentifier stays the same across resumptions of a persistent "
        "session")
    honour_will_delay: bool = _guess(
        True, "§1.3", "MQTT 5 Will Delay Interval honoured per the MQTT spec, capped by the "
        "session expiry")
    takeover_publishes_will_at_once: bool = _guess(
        True, "§1.3", "on a duplicate client id the old connection's Will is published at once, "
        "ignoring its Will Delay (AWS: the Will IS published)")
    set_dup_on_redelivery: bool = _guess(
        False, "§1.1", "DUP flag is never set on redelivery (AWS does not support DUP)")

    # -- QoS 2 -----------------------------------------------------------------------------------
    qos2_publish_reason_code: int = _guess(
        0x9B, "§1.4", "MQTT 5 PUBLISH with QoS 2 → DISCONNECT with this code (3.1.1: close)")
    subscribe_qos2_311: Qos2Subscribe = _guess(  # noqa: RUF009
        Qos2Subscribe.DISCONNECT, "§1.4", "3.1.1 SUBSCRIBE asking QoS 2: no SUBACK, connection "
        "closed")
    subscribe_qos2_5: Qos2Subscribe = _guess(  # noqa: RUF009
        Qos2Subscribe.DOWNGRADE, "§1.4", "MQTT 5 SUBSCRIBE asking QoS 2: SUBACK grants QoS 1")

    # -- authorization outcomes -----------------------------------------------------------------
    denied_subscribe_disconnects_311: bool = _guess(
        True, "§1.9", "3.1.1 SUBSCRIBE with an unauthorized filter closes the connection "
        "(AUTH_ERROR); off: SUBACK 0x80 for the denied filters. MQTT 5: SUBACK 0x87 per denied "
        "filter")
    denied_publish_disconnects_5: bool = _guess(
        False, "§1.9", "MQTT 5 unauthorized PUBLISH: QoS 1 gets PUBACK 0x87 and QoS 0 is dropped "
        "silently, the connection stays; on: DISCONNECT 0x87")
    reserved_topic_misuse_denied: bool = _guess(
        True, "§1.5", "PUBLISH to $aws/events/... or with RETAIN to a $-topic is handled as an "
        "unauthorized PUBLISH")
    shared_subscribe_checks_full_filter: bool = _guess(
        True, "§3.2", "iot:Subscribe for a shared subscription is checked on the full "
        "$share/<group>/<filter> string (off: on the filter after the prefix)")
    send_no_matching_subscribers: bool = _guess(
        False, "§1.7", "PUBACK 0x10 'No matching subscribers' is never sent (on: MQTT 5 QoS 1 "
        "PUBLISHes nobody subscribes to get it)")

    # -- limit violations -------------------------------------------------------------------------
    invalid_topic_disconnects_311: bool = _guess(
        True, "§1.5", "3.1.1 topic name/filter breaking the size or slash limit closes the "
        "connection (CLIENT_ERROR); off: SUBACK 0x80 / publish dropped. MQTT 5: PUBACK 0x90, "
        "SUBACK 0x8F, or DISCONNECT 0x90 for a QoS 0 PUBLISH")
    subscription_quota_disconnects_311: bool = _guess(
        True, "§1.8", "3.1.1 SUBSCRIBE beyond 8 filters or 50 subscriptions (and UNSUBSCRIBE "
        "beyond 8 filters) closes the connection; off: SUBACK 0x80. MQTT 5: SUBACK 0x97 for "
        "the filters refused (all of them when over 8), UNSUBACK 0x80")
    payload_too_large_reason_code: int = _guess(
        0x95, "§1.8", "MQTT 5 DISCONNECT code for a payload over the limit (lifecycle "
        "CLIENT_ERROR)")
    publish_throttle_reason_code: int = _guess(
        0x97, "§1.8", "MQTT 5 PUBACK for a QoS 1 PUBLISH over the per-connection rate (3.1.1: "
        "PUBACK, message discarded)")

    # -- certificate and policy changes ----------------------------------------------------------
    certificate_revocation_delay: float = _guess(
        0.0, "§2.3", "seconds between a certificate leaving ACTIVE and its connections being "
        "closed (AWS: 'within a few minutes')")
    revoked_disconnect_reason: str = _guess(
        "AUTH_ERROR", "§2.3", "lifecycle disconnectReason when a certificate leaves ACTIVE "
        "(MQTT 5 DISCONNECT 0x98)")
    policy_cache_delay: float = _guess(
        0.0, "§1.9", "seconds before policy, attachment or thing changes reach live connections")
    disconnect_at_principal_expiry: bool = _guess(
        False, "fleet §2.2", "a connection made with a principal that expires (temporary claim) "
        "stays open past the expiry; new connections are refused")

    # -- lifecycle events ------------------------------------------------------------------------
    lifecycle_event_qos: int = _guess(
        1, "§4.1", "QoS at which lifecycle events are published to subscribers")
    version_number_reset_after: float = _guess(
        3600.0, "§4.2", "versionNumber restarts at 0 after this long disconnected")
    client_initiated_on_connection_lost: bool = _guess(
        True, "§4.2", "clientInitiatedDisconnect is true for CONNECTION_LOST (the client closed "
        "the socket) as for CLIENT_INITIATED_DISCONNECT")
    subscribed_event_lists_granted_only: bool = _guess(
        True, "§4.3", "subscribed events list only the filters granted in the SUBACK")
    advertise_shared_subscriptions: bool = _guess(
        False, "§1.7", "CONNACK does not carry Shared Subscription Available (absent = "
        "available)")

    # -- emulator knobs (not AWS behaviour) -------------------------------------------------------
    connect_timeout: float = _knob(10.0, "seconds from TLS handshake to CONNECT (slow-loris)")
    packet_timeout: float = _knob(10.0, "seconds a started packet has to complete (slow-loris)")
    tls_handshake_timeout: float = _knob(10.0, "seconds for the TLS handshake")
    tls_engine: str = _knob(
        "bundled", "TLS library of the listener: 'bundled' = the OpenSSL inside the "
        "cryptography wheel through pyOpenSSL (harness.tls_engine; ~0.3 ms less CPU per "
        "handshake), 'stdlib' = Python's ssl on the system OpenSSL")
    write_buffer_limit: int = _knob(
        1024 * 1024, "bytes buffered for a slow reader before QoS 0 deliveries are dropped "
        "and QoS 1 ones queued")
    observe_publishes: bool = _knob(
        True, "record a PUBLISH observation per inbound message (off for load benchmarks)")
    max_connections: int | None = _knob(None, "refuse connections beyond this many (None: no "
                                        "limit; AWS's account quota is 500,000)")

    def __post_init__(self) -> None:
        if self.tls_engine not in ("bundled", "stdlib"):
            raise ValueError("tls_engine must be 'bundled' or 'stdlib'")
        if not 1 <= self.keep_alive_min <= self.keep_alive_max <= 65535:
            raise ValueError("need 1 <= keep_alive_min <= keep_alive_max <= 65535")
        if self.keep_alive_grace <= 0:
            raise ValueError("keep_alive_grace must be positive")
        if not 0 <= self.persistent_session_expiry <= 604800:
            raise ValueError("persistent_session_expiry must be within 0..604800 (7 days)")
        if self.lifecycle_event_qos not in (0, 1):
            raise ValueError("lifecycle_event_qos must be 0 or 1")
        if self.max_inflight_outbound < 1 or self.receive_maximum < 1:
            raise ValueError("in-flight windows must be at least 1")
        if self.max_packet_bytes < self.max_payload_bytes:
            raise ValueError("max_packet_bytes must not be below max_payload_bytes")

    def replace(self, **changes: Any) -> BrokerSettings:
        """A copy with ``changes`` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Guess:
    """One UNCONFIRMED behaviour: the setting that controls it and what the default does."""

    name: str
    default: Any
    spec: str
    text: str

    @property
    def flag(self) -> str:
        """The command-line spelling (``--explain-refusals``)."""
        return "--" + self.name.replace("_", "-")


def describe_guesses(settings: BrokerSettings | None = None) -> list[Guess]:
    """Every UNCONFIRMED behaviour with its (current) value, in declaration order."""
    settings = settings or BrokerSettings()
    out = []
    for f in dataclasses.fields(BrokerSettings):
        if "guess" in f.metadata:
            value = getattr(settings, f.name)
            out.append(Guess(f.name, value.value if isinstance(value, Enum) else value,
                             f.metadata["spec"], f.metadata["guess"]))
    return out


def guesses_markdown(settings: BrokerSettings | None = None) -> str:
    """The README table of :func:`describe_guesses`."""
    lines = ["| setting | default | spec | behaviour |", "| --- | --- | --- | --- |"]
    for g in describe_guesses(settings):
        default = hex(g.default) if g.name.endswith("reason_code") else repr(g.default)
        lines.append(f"| `{g.name}` | `{default}` | {g.spec} | {g.text} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(guesses_markdown())
