"""The load run's device flows, fleet setup and post-run truth check, against the emulator.

Everything here runs without Locust (and so without gevent): the fleet is set up through
the control plane as a load run's master does, devices run the load users' flow
(``loadtests.flows.DeviceSlot``) in this thread, and the truth check reads the endpoint
back through boto3. Inconsistencies are planted through the control plane, the way a
broken endpoint or a lying device would produce them.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.base import CertApi, Flow
from harness import pki
from loadtests.events import FlowJournal, FlowOutcome, StepName, new_serial
from loadtests.fleet_setup import FleetHandoff, LoadFleet, open_target
from loadtests.flows import DeviceSlot, FlowSettings, FlowTarget
from loadtests.truth import ProblemKind, check_run


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Any]:
    from harness.endpoints.local import LocalEndpoint

    ep = LocalEndpoint.start(mode="in-process")
    try:
        yield ep
    finally:
        ep.close()


@pytest.fixture(scope="module")
def fleet(endpoint: Any) -> Iterator[LoadFleet]:
    made = LoadFleet(endpoint, "test-run", f"lt{uuid.uuid4().hex[:6]}")
    made.setup()
    try:
        yield made
    finally:
        made.teardown()


@pytest.fixture(scope="module")
def target(fleet: LoadFleet, tmp_path_factory: pytest.TempPathFactory) -> FlowTarget:
    assert fleet.handoff is not None
    return open_target(fleet.handoff, tmp_path_factory.mktemp("fleet"), trusted_user=True)


class Sink:
    def __init__(self) -> None:
        self.steps: list[tuple[str, str | None]] = []

    def step(self, name: StepName, duration_s: float, error_code: str | None = None) -> None:
        self.steps.append((name.value, error_code))

    def throttle(self, name: StepName, wait_s: float) -> None:
        pass


def run_flows(target: FlowTarget, workdir: Path, n: int, sink: Any = None,
              **settings: Any) -> list[FlowOutcome]:
    slot = DeviceSlot(target, FlowSettings(**settings), workdir, sink or Sink())
    return [slot.run(new_serial()) for _ in range(n)]


# --------------------------------------------------------------------------- setup


def test_the_fleet_handoff_round_trips_and_never_shows_its_secrets(fleet: LoadFleet) -> None:
    handoff = fleet.handoff
    assert handoff is not None
    assert FleetHandoff.from_json(handoff.to_json()) == handoff
    assert "PRIVATE KEY" in handoff.claim_key_pem
    assert "PRIVATE KEY" not in repr(handoff) and handoff.claim_key_pem in handoff.secrets
    assert handoff.template_name == f"{fleet.prefix}-template"
    with pytest.raises(ValueError, match="version"):
        FleetHandoff.from_json(handoff.to_json().replace('"version":1', '"version":99'))


def test_setup_makes_the_template_and_an_active_ec_claim_with_the_claim_policy(
        endpoint: Any, fleet: LoadFleet) -> None:
    assert fleet.handoff is not None
    iot = endpoint.iot
    template = iot.describe_provisioning_template(templateName=fleet.template_name)
    assert template["enabled"] is True
    claim = iot.describe_certificate(certificateId=fleet.handoff.claim_certificate_id)
    assert claim["certificateDescription"]["status"] == "ACTIVE"
    arn = claim["certificateDescription"]["certificateArn"]
    policies = [p["policyName"] for p in iot.list_attached_policies(target=arn)["policies"]]
    assert policies == [fleet.fleet.claim_policy_name]
    assert "BEGIN EC PRIVATE KEY" in fleet.handoff.claim_key_pem or \
        "BEGIN PRIVATE KEY" in fleet.handoff.claim_key_pem


def test_unpacked_claim_files_are_private(target: FlowTarget) -> None:
    assert target.claim is not None
    assert target.claim.key_file.stat().st_mode & 0o777 == 0o600
    assert target.claim.key_file.parent.stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------- device flows


@pytest.mark.parametrize(("cert_api", "fmt", "api_step"), [
    (CertApi.CSR, "json", "CreateCertificateFromCsr"),
    (CertApi.KEYS, "cbor", "CreateKeysAndCertificate"),
])
def test_every_flow_is_a_fresh_device_from_claim_to_its_own_certificate(
        target: FlowTarget, tmp_path: Path, cert_api: CertApi, fmt: str, api_step: str) -> None:
    # spec fleet §1.2/§1.3/§1.4: certificate, RegisterThing, reconnect with the new certificate
    sink = Sink()
    outcomes = run_flows(target, tmp_path, 2, sink, cert_api=cert_api, payload_format=fmt)
    assert all(o.ok for o in outcomes), [(o.failed_step, o.error_code) for o in outcomes]
    assert len({o.certificate_id for o in outcomes}) == 2
    assert [o.thing_name for o in outcomes] == [target.thing_name(o.serial) for o in outcomes]
    assert sink.steps == 2 * [("connect(claim)", None), (api_step, None),
                              ("RegisterThing", None), ("connect(device)", None)]


def test_a_slot_connects_each_device_with_its_own_certificate(
        endpoint: Any, target: FlowTarget, tmp_path: Path) -> None:
    # The slot reuses one TLS context and swaps the identity per device (SlotContext):
    # the endpoint must see every device's CONNECT with that device's certificate.
    outcomes = run_flows(target, tmp_path, 3)
    assert all(o.ok for o in outcomes), [(o.failed_step, o.error_code) for o in outcomes]
    for o in outcomes:
        assert o.certificate_id is not None
        connects = endpoint.admin.events(certificate_id=o.certificate_id, kinds=["connect"],
                                         wait=5)
        assert [e.client_id for e in connects] == [o.thing_name]
    device_file = tmp_path / "device.pem"
    assert device_file.stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_mode & 0o777 == 0o700


def test_a_connection_keeps_the_identity_it_was_made_with_when_the_slot_loads_the_next(
        endpoint: Any, target: FlowTarget, tmp_path: Path) -> None:
    # SlotContext's premise: OpenSSL copies the context's certificate into a connection
    # when the connection is made, so loading the next identity cannot change it.
    import socket

    from devices.mqtt_transport import SlotContext, TlsIdentity
    from harness.emulator.mqtt.codec import Decoder, encode
    from harness.emulator.mqtt.packets import Connack, Connect

    assert target.claim is not None
    slot = DeviceSlot(target, FlowSettings(), tmp_path / "slot", Sink())
    device = slot.run(new_serial())
    assert device.ok and device.certificate_id
    other = TlsIdentity.for_endpoint(target.endpoint, tmp_path / "slot" / "device.pem",
                                     tmp_path / "slot" / "device.pem")
    contexts = SlotContext.for_endpoint(target.endpoint)
    ctx = contexts.load(target.claim)
    sock = socket.create_connection((target.endpoint.host, target.endpoint.port), timeout=10)
    tls = ctx.wrap_socket(sock, do_handshake_on_connect=False)
    contexts.load(other)  # after the connection was made, before its handshake
    client_id = f"slot-{uuid.uuid4().hex[:8]}"
    try:
        tls.do_handshake()
        tls.sendall(encode(Connect(4, client_id, keep_alive=60), 4))
        decoder, packets = Decoder(protocol_level=4), []
        while not packets:
            packets = decoder.feed(tls.recv(4096))
        assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
    finally:
        tls.close()
    connects = endpoint.admin.events(client_id=client_id, kinds=["connect"], wait=5)
    assert [e.certificate_id for e in connects] == \
        [pki.certificate_id(target.claim.cert_file.read_text())]


COOPERATIVE_RUN = """
import json, sys
from gevent import monkey
monkey.patch_all()
import gevent
from pathlib import Path
from devices.mqtt_transport import LoopDriver
from loadtests.events import new_serial
from loadtests.fleet_setup import FleetHandoff, open_target
from loadtests.flows import DeviceSlot, FlowSettings

handoff, workdir = FleetHandoff.from_json(sys.stdin.read()), Path(sys.argv[1])
target = open_target(handoff, workdir / "fleet", trusted_user=False)
driver = LoopDriver(cooperative=True)
loop = gevent.spawn(driver.run_forever)

class Sink:
    def step(self, *args): pass
    def throttle(self, *args): pass

def user(n):
    slot = DeviceSlot(target, FlowSettings(), workdir / f"slot-{n}", Sink(), driver=driver)
    return [slot.run(new_serial()) for _ in range(2)]

users = [gevent.spawn(user, n) for n in range(6)]
gevent.joinall(users, timeout=60)
driver.stop()
loop.join(5)
print(json.dumps([o.to_wire() for u in users for o in u.value or ()]))
"""


def test_a_cooperative_loop_driver_serves_greenlets_that_write_inline(
        endpoint: Any, fleet: LoadFleet, tmp_path: Path) -> None:
    # issue 8: a Locust process (gevent) drives every connection from one loop; its users'
    # packets are written at once from their own greenlets (LoopDriver(cooperative=True))
    import subprocess
    import sys

    assert fleet.handoff is not None
    done = subprocess.run([sys.executable, "-c", COOPERATIVE_RUN, str(tmp_path)],
                          input=fleet.handoff.to_json(), capture_output=True, text=True,
                          timeout=120, check=True)
    outcomes = [FlowOutcome.from_wire(w) for w in json.loads(done.stdout.splitlines()[-1])]
    assert len(outcomes) == 12
    assert all(o.ok for o in outcomes), [(o.failed_step, o.error_code) for o in outcomes]
    report = check_run(endpoint.iot, fleet.prefix, outcomes)
    assert report.ok and report.verified == 12, report.summary_lines()


def test_a_trusted_user_device_gets_its_claim_from_the_control_plane_first(
        target: FlowTarget, tmp_path: Path) -> None:
    # spec fleet §2.1: CreateProvisioningClaim, then the same MQTT calls with the temporary claim
    sink = Sink()
    (o,) = run_flows(target, tmp_path, 1, sink, flow=Flow.TRUSTED_USER, cert_api=CertApi.CSR)
    assert o.ok, (o.failed_step, o.error_code)
    assert [s for s, _ in sink.steps] == ["CreateProvisioningClaim", "connect(claim)",
                                          "CreateCertificateFromCsr", "RegisterThing",
                                          "connect(device)"]


def test_a_failed_flow_reports_the_step_and_the_certificate_it_already_had(
        target: FlowTarget, tmp_path: Path) -> None:
    wrong = dataclasses.replace(target, template_name=f"{target.prefix}-missing")
    # subscribing before each call, the device has its certificate when RegisterThing fails
    (o,) = run_flows(wrong, tmp_path, 1, response_timeout_s=3.0, subscribe="per-call")
    assert not o.ok and not o.interrupted
    assert o.failed_step == "RegisterThing" and o.error_code
    assert o.certificate_id is not None and o.thing_name is None
    # subscribing once up front, the claim policy refuses the other template's topics first
    (o,) = run_flows(wrong, tmp_path, 1, response_timeout_s=3.0)
    assert not o.ok and o.failed_step == "CreateCertificateFromCsr" and o.error_code
    assert o.certificate_id is None


# --------------------------------------------------------------------------- truth


def test_the_endpoint_confirms_every_success_of_a_consistent_run(
        endpoint: Any, fleet: LoadFleet, target: FlowTarget, tmp_path: Path) -> None:
    outcomes = run_flows(target, tmp_path, 3)
    report = check_run(endpoint.iot, fleet.prefix, outcomes)
    assert report.ok, report.summary_lines()
    assert (report.successes, report.checked, report.verified) == (3, 3, 3)
    assert report.failed_flows == 0 and report.failed_with_active_certificate == 0


def test_a_failed_flow_that_left_no_active_certificate_is_no_problem(
        endpoint: Any, fleet: LoadFleet, target: FlowTarget, tmp_path: Path) -> None:
    wrong = dataclasses.replace(target, template_name=f"{target.prefix}-missing")
    failed = run_flows(wrong, tmp_path, 1, response_timeout_s=3.0)
    report = check_run(endpoint.iot, fleet.prefix, failed)
    assert report.ok and report.failed_flows == 1
    assert report.failed_with_active_certificate == 0


def _arn(iot: Any, certificate_id: str) -> str:
    desc = iot.describe_certificate(certificateId=certificate_id)["certificateDescription"]
    return str(desc["certificateArn"])


def test_the_truth_check_catches_planted_inconsistencies(
        endpoint: Any, fleet: LoadFleet, target: FlowTarget, tmp_path: Path) -> None:
    iot = endpoint.iot
    inactive, unpoliced, lied_failed, honest = run_flows(target, tmp_path, 4)
    assert all(o.ok for o in (inactive, unpoliced, lied_failed, honest))
    # the endpoint lost what a success needs ...
    assert inactive.certificate_id and unpoliced.certificate_id
    iot.update_certificate(certificateId=inactive.certificate_id, newStatus="INACTIVE")
    arn = _arn(iot, unpoliced.certificate_id)
    for policy in iot.list_attached_policies(target=arn)["policies"]:
        iot.detach_policy(policyName=policy["policyName"], target=arn)
    # ... Locust counted a success that never reached the endpoint ...
    phantom = FlowOutcome(serial=new_serial(), ok=True, started_at=1.0, duration=0.1,
                          certificate_id="0" * 64)
    # ... and a device reported a failure although its certificate is active
    failed = dataclasses.replace(lied_failed, ok=False, error_code="Timeout",
                                 failed_step="connect(device)")
    report = check_run(iot, fleet.prefix, [inactive, unpoliced, phantom, failed, honest])
    assert not report.ok
    assert (report.successes, report.verified, report.failed_flows,
            report.failed_with_active_certificate) == (4, 1, 1, 1)
    kinds = {(p.kind, p.serial) for p in report.problems}
    assert kinds == {(ProblemKind.CERTIFICATE_NOT_ACTIVE, inactive.serial),
                     (ProblemKind.POLICY_MISSING, unpoliced.serial),
                     (ProblemKind.THING_MISSING, phantom.serial),
                     (ProblemKind.FAILED_FLOW_LEFT_ACTIVE_CERTIFICATE, failed.serial)}
    text = "\n".join(report.summary_lines())
    assert "1 of 4 successful flows" in text and "1 of 1 failed flows" in text


def test_a_sample_checks_that_many_successes_and_says_so(
        endpoint: Any, fleet: LoadFleet, target: FlowTarget, tmp_path: Path) -> None:
    outcomes = run_flows(target, tmp_path, 3)
    report = check_run(endpoint.iot, fleet.prefix, outcomes, sample=2)
    assert (report.successes, report.checked, report.verified) == (3, 2, 2)
    assert report.sampled and "random sample of 3" in report.summary_lines()[0]


def test_a_journal_of_the_run_feeds_the_check_unchanged(
        endpoint: Any, fleet: LoadFleet, target: FlowTarget, tmp_path: Path) -> None:
    worker, master = FlowJournal(ship=True), FlowJournal()
    for o in run_flows(target, tmp_path, 2):
        worker.add(o)
    master.merge(worker.drain())
    assert check_run(endpoint.iot, fleet.prefix, master.outcomes).verified == 2


@pytest.mark.parametrize(("subscribe", "shape"), [("once", [4]), ("per-call", [2, 2])])
def test_a_device_subscribes_once_for_both_calls_or_before_each_call(
        endpoint: Any, target: FlowTarget, tmp_path: Path, subscribe: str,
        shape: list[int]) -> None:
    [outcome] = run_flows(target, tmp_path, 1, subscribe=subscribe)
    assert outcome.ok, (outcome.failed_step, outcome.error_code)
    subscribes = endpoint.admin.events(kinds=["subscribe"], client_id=f"{outcome.serial}-claim",
                                       wait=5)
    assert [len(e.detail["filters"]) for e in subscribes] == shape
    filters = [f for e in subscribes for f in e.detail["filters"]]
    assert any("/create-from-csr/" in f for f in filters)
    assert any(f"/{target.template_name}/provision/" in f for f in filters)
    assert all(code < 0x80 for e in subscribes for code in e.detail["reason_codes"])


def test_an_unknown_subscribe_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="subscribe must be one of"):
        FlowSettings(subscribe="sometimes")
