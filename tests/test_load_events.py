"""Request events, flow records and throttle accounting of load runs (issue 8).

Locust is not imported: ``loadtests.events`` takes the request event's ``fire`` as a plain
callable, so these tests collect what would reach Locust's statistics.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from devices.mqtt_transport import Message
from devices.virtual import Jitter, ProvisioningClient, Rejected, RetryPolicy
from harness import protocol as fp
from harness.protocol import Api, PayloadFormat
from loadtests.events import (
    KEEP_FAILED_FLOWS,
    THROTTLE_TYPE,
    FlowJournal,
    FlowOutcome,
    RequestEvents,
    StepName,
    StepTiming,
    Tee,
    ThrottleMeter,
    new_serial,
)


class Fired:
    """Collects request events as Locust's ``events.request.fire`` would receive them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.events.append(kwargs)


def outcome(serial: str, ok: bool = True, **kw: Any) -> FlowOutcome:
    return FlowOutcome(serial=serial, ok=ok, started_at=1000.0, duration=0.25, **kw)


def test_each_step_is_a_request_event_named_after_the_api_with_its_latency() -> None:
    fired = Fired()
    events = RequestEvents(fired)
    events.step(StepName.CREATE_CERTIFICATE_FROM_CSR, 0.0125)
    events.step(StepName.CREATE_PROVISIONING_CLAIM, 0.2)
    (csr, claim) = fired.events
    assert (csr["request_type"], csr["name"], csr["exception"]) == \
        ("MQTT", "CreateCertificateFromCsr", None)
    assert csr["response_time"] == pytest.approx(12.5)
    assert (claim["request_type"], claim["name"]) == ("HTTPS", "CreateProvisioningClaim")


def test_a_failed_step_carries_only_the_aws_error_code_so_locust_groups_by_it() -> None:
    # spec fleet §1.5: the rejected payload's errorCode names the failure
    fired = Fired()
    RequestEvents(fired).step(StepName.REGISTER_THING, 0.03, "InvalidCertificateOwnershipToken")
    assert str(fired.events[0]["exception"]) == "InvalidCertificateOwnershipToken"


def test_a_failed_flow_names_the_step_it_failed_at() -> None:
    fired = Fired()
    RequestEvents(fired).flow(outcome("a1", ok=False, error_code="ThrottlingException",
                                      failed_step="RegisterThing"))
    (flow,) = fired.events
    assert flow["name"] == "flow"
    assert str(flow["exception"]) == "RegisterThing: ThrottlingException"
    assert flow["response_time"] == pytest.approx(250.0)


def test_a_throttle_is_its_own_event_type_never_a_failure() -> None:
    fired = Fired()
    RequestEvents(fired).throttle(StepName.REGISTER_THING, 0.4)
    (event,) = fired.events
    assert event["request_type"] == THROTTLE_TYPE and event["exception"] is None
    assert event["response_time"] == pytest.approx(400.0)  # the backoff the device waited


class ThrottlingTransport:
    """The network below ProvisioningClient: rejects with 429 ThrottlingException ``n``
    times, then accepts (spec fleet §5: a throttled device sees statusCode 429)."""

    def __init__(self, throttles: int, accepted: dict[str, Any]) -> None:
        self.throttles = throttles
        self.accepted = accepted
        self.requests = 0

    def request(self, topic: str, payload: bytes, *, accepted: str, rejected: str,
                timeout: float) -> Message:
        self.requests += 1
        if self.requests <= self.throttles:
            body = {"statusCode": 429, "errorCode": "ThrottlingException",
                    "errorMessage": "Rate exceeded"}
            return Message(rejected, fp.encode(body, PayloadFormat.JSON), 1)
        return Message(accepted, fp.encode(self.accepted, PayloadFormat.JSON), 1)


class Sink:
    def __init__(self) -> None:
        self.steps: list[tuple[StepName, float, str | None]] = []
        self.throttles: list[tuple[StepName, float]] = []

    def step(self, name: StepName, duration_s: float, error_code: str | None = None) -> None:
        self.steps.append((name, duration_s, error_code))

    def throttle(self, name: StepName, wait_s: float) -> None:
        self.throttles.append((name, wait_s))


def test_throttled_requests_are_retried_with_backoff_and_each_throttle_is_counted() -> None:
    # spec fleet §5: 429 ThrottlingException is retried like AWS's SDKs do
    sink, waited = Sink(), list[float]()
    meter = ThrottleMeter(sink, sleep=waited.append)
    meter.current = StepName.REGISTER_THING
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=1.0, jitter=Jitter.FULL)
    transport = ThrottlingTransport(2, {"thingName": "fb-1", "deviceConfiguration": {}})
    client = ProvisioningClient(transport, "json",  # type: ignore[arg-type]
                                retry=policy, rng=random.Random(7), sleep=meter)
    response = client.register_thing("tpl", "token", {"SerialNumber": "1"})
    assert response.thing_name == "fb-1" and client.attempts == 3
    assert meter.count == 2
    expected = random.Random(7)
    assert waited == [expected.uniform(0, 0.1), expected.uniform(0, 0.2)]
    assert sink.throttles == [(StepName.REGISTER_THING, waited[0]),
                              (StepName.REGISTER_THING, waited[1])]


def test_a_request_still_throttled_after_the_last_attempt_fails_with_throttling() -> None:
    sink = Sink()
    meter = ThrottleMeter(sink, sleep=lambda _s: None)
    meter.current = StepName.CREATE_CERTIFICATE_FROM_CSR
    client = ProvisioningClient(ThrottlingTransport(10, {}), "json",  # type: ignore[arg-type]
                                retry=RetryPolicy(max_attempts=3), sleep=meter)
    with pytest.raises(Rejected) as caught:
        client.create_certificate_from_csr("csr")
    assert caught.value.response.error_code == "ThrottlingException"
    assert caught.value.attempts == 3 and meter.count == 2  # two retries, then it gives up


def test_throttles_are_counted_apart_from_failures_in_the_journal() -> None:
    journal = FlowJournal()
    sink = Tee([RequestEvents(Fired()), journal])
    for _ in range(3):
        sink.throttle(StepName.REGISTER_THING, 0.1)
    sink.throttle(StepName.CONNECT_CLAIM, 0.1)
    journal.add(outcome("ok1", throttles=3))
    journal.add(outcome("bad", ok=False, error_code="ThrottlingException",
                        failed_step="RegisterThing"))
    journal.add(outcome("cut", ok=False, interrupted=True))
    assert journal.throttles == {"RegisterThing": 3, "connect(claim)": 1}
    assert (journal.totals.ok, journal.totals.failed, journal.totals.interrupted,
            journal.totals.throttled_out) == (1, 1, 1, 1)
    assert [o.serial for o in journal.failures()] == ["bad"]


def test_a_workers_flows_reach_the_master_once_through_its_stats_reports() -> None:
    worker, master = FlowJournal(ship=True), FlowJournal()
    worker.add(outcome("w1", thing_name="p-w1", certificate_id="c1"))
    worker.throttle(StepName.REGISTER_THING)
    master.merge(worker.drain())
    assert worker.drain() == {}  # nothing is sent twice
    worker.add(outcome("w2", ok=False, error_code="Timeout", failed_step="connect(device)"))
    master.merge(worker.drain())
    assert [(o.serial, o.ok, o.thing_name, o.certificate_id) for o in master.outcomes] == \
        [("w1", True, "p-w1", "c1"), ("w2", False, None, None)]
    assert master.throttles == {"RegisterThing": 1}
    assert worker.outcomes == []  # a worker keeps nothing it has shipped


def test_step_records_are_kept_for_a_bounded_number_of_failed_flows_only() -> None:
    journal = FlowJournal()
    steps = (StepTiming("connect(claim)", 1.0, 0.01), StepTiming("RegisterThing", 1.1, 0.02,
                                                                 "Timeout"))
    journal.add(outcome("good", steps=steps))
    for i in range(KEEP_FAILED_FLOWS + 5):
        journal.add(outcome(f"bad{i}", ok=False, error_code="Timeout", steps=steps))
    assert journal.outcomes[0].steps == ()
    kept = [o for o in journal.outcomes if o.steps]
    assert len(kept) == KEEP_FAILED_FLOWS
    wire = FlowOutcome.from_wire(kept[0].to_wire(with_steps=True))
    assert wire == kept[0]


def test_serials_are_twelve_hex_digits_and_unique_enough_for_many_workers() -> None:
    serials = {new_serial() for _ in range(5000)}
    assert len(serials) == 5000
    assert all(len(s) == 12 and int(s, 16) >= 0 for s in serials)


def test_api_step_names_are_awss_operation_names() -> None:
    assert [StepName.for_api(a).value for a in Api] == [a.value for a in Api]


def test_a_claim_csr_run_states_issue_8s_targets_and_other_runs_do_not() -> None:
    # issue 8: >= 150 CSR flows/s with no failures; load generator CPU within 1.5x the emulator's
    from loadtests.report import target_lines

    def settings(users: list[str], sustained: float, failed: int,
                 ratio: float | None) -> dict[str, Any]:
        return {"flow": {"user_classes": users}, "totals": {"failed": failed},
                "rates": {"sustained_flows_per_s": sustained},
                "cpu": {"load_to_emulator_ratio": ratio}}

    (line,) = target_lines(settings(["ClaimCsrUser"], 151.0, 0, 1.2))
    assert "150 CSR flows/s sustained with no failures: meets (151.0 flows/s, 0 failed)" in line
    assert "<= 1.5x the emulator's: meets (1.20x)" in line
    (line,) = target_lines(settings(["ClaimCsrUser"], 160.0, 3, 1.6))
    assert "failures: MISSES" in line and "emulator's: MISSES (1.60x)" in line
    assert target_lines(settings(["ClaimKeysUser"], 10.0, 0, 1.0)) == []
    assert target_lines(settings(["ClaimCsrUser"], 10.0, 0, None)) == []  # AWS: no emulator CPU
