"""The emulator started in-process (:class:`EmbeddedEmulator` + :class:`EmulatorConfig`).

The same behaviours as ``fleetbench emulator`` where they make sense in one process
(issue 2: "The same endpoint can be started in-process from Python (for tests) with the
same options"): ``endpoint.json``, the CA and server certificate, file modes, the
temporary data dir, region and account in ARNs, restart on the same data dir, writes
committed before they are acknowledged, a failed start that cleans up, and two embedded
emulators in one process that share nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices.base import (
    ClaimCredentials,
    DeviceResult,
    EndpointParams,
    Step,
)
from devices.mqtt_transport import MqttTransport, TlsIdentity
from harness import pki
from harness.admin_client import AdminClient
from harness.emulator.app import EmbeddedEmulator, EmulatorConfig
from harness.endpoint_info import EndpointInfo
from harness.observations import Kind
from tests.device_kit import (
    REQUIRED_FIELDS,
    SAN_DNS,
    SAN_IP,
    STOP_TIMEOUT,
    boot,
    certificate_from_csr,
    device_inputs,
    iot_client,
    new_fleet,
    provision_two,
    ran,
    refuses_connections,
    tls_handshake,
)

REGION, ACCOUNT = "ap-southeast-2", "444455556666"
#: What the registry keeps in ``data_dir``: a crash image copies exactly these.
IDENTITY_FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "ownership-token.key")
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]})


def config(data_dir: Path | None, **options: Any) -> EmulatorConfig:
    """Free ports and a small key pool (the default 32 RSA keys cost seconds of CPU)."""
    return EmulatorConfig(mqtt_port=0, api_port=0, data_dir=data_dir, key_pool_size=2,
                          **options)


@contextlib.contextmanager
def embedded(data_dir: Path | None, **options: Any) -> Iterator[EmbeddedEmulator]:
    with EmbeddedEmulator(config(data_dir, **options)) as emu:
        yield emu


def api_port(info: EndpointInfo) -> int:
    return int(info.api_url.rsplit(":", 1)[1])


def allowed_identity(info: EndpointInfo, directory: Path) -> TlsIdentity:
    """A registered, ACTIVE certificate that may do anything, written to ``directory``."""
    iot = iot_client(info)
    made, key_pem = certificate_from_csr(iot)
    policy = f"allow-{uuid.uuid4().hex[:8]}"
    iot.create_policy(policyName=policy, policyDocument=ALLOW_ALL)
    iot.attach_policy(policyName=policy, target=made["certificateArn"])
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_public(directory / "device.pem", made["certificatePem"])
    pki.write_secret(directory / "device.key", key_pem)
    params = EndpointParams.from_endpoint_info(info)
    return TlsIdentity.for_endpoint(params, directory / "device.pem", directory / "device.key")


def connected(info: EndpointInfo, identity: TlsIdentity, client_id: str) -> MqttTransport:
    transport = MqttTransport(client_id, EndpointParams.from_endpoint_info(info), identity)
    transport.connect(timeout=10)
    return transport


# -- one embedded emulator for the read-only checks -----------------------------------------------

@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEmulator]:
    data_dir = tmp_path_factory.mktemp("embedded") / "data"
    with embedded(data_dir, region=REGION, account_id=ACCOUNT, sans=(SAN_DNS, SAN_IP)) as emu:
        yield emu


def test_endpoint_json_has_every_field_and_equals_the_started_info(emu: EmbeddedEmulator) -> None:
    # issue 2: endpoint.json once listening; in-process start returns the same information
    path = Path(emu.info.data_dir) / "endpoint.json"
    written = json.loads(path.read_text())
    assert set(REQUIRED_FIELDS) <= set(written)
    assert EndpointInfo.read(path) == emu.info
    assert (written["region"], written["account_id"]) == (REGION, ACCOUNT)
    assert written["mqtt_port"] > 0 and api_port(emu.info) > 0  # port 0 picked free ports
    assert not path.with_name("endpoint.json.tmp").exists()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", SAN_DNS, SAN_IP])
def test_ca_file_verifies_the_server_certificate_for_each_of_its_names(
        emu: EmbeddedEmulator, name: str) -> None:
    # issue 2: server certificate for localhost, 127.0.0.1 and every san, signed by ca_file
    presented = tls_handshake(emu.info, name, emu.info.ca_file)
    server_pem = (Path(emu.info.data_dir) / "server.pem").read_bytes()
    assert presented == pki.load_certificate(server_pem)


def test_the_server_certificate_does_not_verify_for_a_name_it_does_not_carry(
        emu: EmbeddedEmulator) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(emu.info, "not-a-san.fleetbench.test", emu.info.ca_file)


def test_key_files_are_0600_and_the_data_dir_0700(emu: EmbeddedEmulator) -> None:
    # issue 2: "kept in the data dir (keys 0600)"
    data_dir = Path(emu.info.data_dir)
    keys = sorted(data_dir.glob("*.key"))
    assert {"ca.key", "server.key"} <= {k.name for k in keys}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_region_and_account_id_are_reflected_in_arns_returned_by_boto3(
        emu: EmbeddedEmulator) -> None:
    # issue 2: region and account options; spec broker §2.1: arn:aws:iot:<region>:<account>:
    iot = iot_client(emu.info)
    prefix = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
    name = f"arn-thing-{uuid.uuid4().hex[:8]}"
    assert iot.create_thing(thingName=name)["thingArn"] == f"{prefix}thing/{name}"
    made, _ = certificate_from_csr(iot)
    assert made["certificateArn"] == f"{prefix}cert/{made['certificateId']}"
    ca = pki.load_certificate(Path(emu.info.ca_file).read_bytes())
    pki.load_certificate(made["certificatePem"]).verify_directly_issued_by(ca)


# -- lifecycle ------------------------------------------------------------------------------------

def test_stop_is_prompt_closes_the_ports_and_removes_the_temporary_data_dir() -> None:
    # issue 2: without a data dir, a fresh temporary directory, removed at exit
    emu = EmbeddedEmulator(config(None))
    info = emu.start()
    data_dir = Path(info.data_dir)
    assert (data_dir / "endpoint.json").is_file() and Path(info.ca_file).parent == data_dir
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < STOP_TIMEOUT
    assert not data_dir.exists()
    assert refuses_connections(info.mqtt_port) and refuses_connections(api_port(info))


def keypool_workers() -> set[int]:
    """Pids of this process's RSA key workers (``python -m harness.emulator.keypool``)."""
    mine = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and b"harness.emulator.keypool" in \
                    (proc / "cmdline").read_bytes():
                mine.add(int(proc.name))
    return mine


def test_a_failed_start_raises_and_releases_what_it_had_started() -> None:
    # design: bad configuration gets a clear error and leaves nothing running behind
    workers_before = keypool_workers()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        emu = EmbeddedEmulator(EmulatorConfig(mqtt_port=taken.getsockname()[1], api_port=0,
                                              key_pool_size=1))
        with pytest.raises(OSError, match=r"(?i)address already in use"):
            emu.start(timeout=30)
    assert not emu.emulator.data_dir.exists()  # its temporary data dir is gone
    assert keypool_workers() <= workers_before  # its key workers too
    emu.stop()  # harmless after a failed start


# -- restart on the same data dir -----------------------------------------------------------------

@dataclass(frozen=True)
class Restarted:
    before: EndpointInfo
    after: EndpointInfo
    files: dict[str, bytes]
    fleet_template: str
    claim: ClaimCredentials
    thing: str
    inactive_certificate: str
    registered: DeviceResult
    registered_dir: Path
    pending_dir: Path
    pending_certificate: str


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restarted]:
    base = tmp_path_factory.mktemp("embedded-restart")
    data_dir = base / "data"
    with embedded(data_dir) as first:
        before = first.info
        iot = iot_client(before)
        devices = provision_two(before, base)
        pending = devices.pending
        assert pending.certificate_id is not None
        thing = f"kept-{uuid.uuid4().hex[:8]}"
        iot.create_thing(thingName=thing, attributePayload={"attributes": {"colour": "teal"}})
        inactive, _ = certificate_from_csr(iot)
        iot.update_certificate(certificateId=inactive["certificateId"], newStatus="INACTIVE")
        files = {name: (data_dir / name).read_bytes() for name in IDENTITY_FILES}
    with embedded(data_dir) as second:
        yield Restarted(
            before=before, after=second.info, files=files,
            fleet_template=devices.fleet.template_name, claim=devices.claim, thing=thing,
            inactive_certificate=inactive["certificateId"], registered=devices.registered,
            registered_dir=devices.registered_dir, pending_dir=devices.pending_dir,
            pending_certificate=pending.certificate_id)


def test_restart_reuses_the_ca_and_the_server_certificate(restarted: Restarted) -> None:
    # issue 2: reused on restart
    data_dir = Path(restarted.after.data_dir)
    assert data_dir == Path(restarted.before.data_dir)
    for name, content in restarted.files.items():
        assert (data_dir / name).read_bytes() == content, name
    presented = tls_handshake(restarted.after, "localhost", restarted.after.ca_file)
    assert pki.certificate_pem(presented).encode() == restarted.files["server.pem"]


def test_restart_keeps_things_policies_and_certificates(restarted: Restarted) -> None:
    # issue 2: "Restarting the emulator on the same data dir keeps everything"
    iot = iot_client(restarted.after)
    assert iot.describe_thing(thingName=restarted.thing)["attributes"] == {"colour": "teal"}
    inactive = iot.describe_certificate(certificateId=restarted.inactive_certificate)
    assert inactive["certificateDescription"]["status"] == "INACTIVE"  # spec broker §2.3
    assert restarted.registered.thing_name is not None
    principals = iot.list_thing_principals(thingName=restarted.registered.thing_name)
    arn = principals["principals"][0]
    assert arn.endswith(f"/{restarted.registered.certificate_id}")
    assert iot.list_attached_policies(target=arn)["policies"]  # the template's policy
    assert iot.describe_provisioning_template(
        templateName=restarted.fleet_template)["templateName"] == restarted.fleet_template


def test_a_device_certificate_issued_before_a_restart_still_connects_and_publishes(
        restarted: Restarted) -> None:
    result = boot(device_inputs(restarted.after, restarted.claim, restarted.fleet_template,
                                "a", restarted.registered_dir))
    assert result.ok, result.failure or result.error
    assert result.step(Step.CONNECT_CLAIM) is None
    assert ran(result, Step.CONNECT_DEVICE) and ran(result, Step.PUBLISH_TELEMETRY)


def test_an_ownership_token_issued_before_a_restart_still_registers_the_thing(
        restarted: Restarted) -> None:
    # spec fleet §1.6: the token is good for an hour, restart or not
    result = boot(device_inputs(restarted.after, restarted.claim, restarted.fleet_template,
                                "b", restarted.pending_dir))
    assert result.ok, result.failure or result.error
    assert result.step(Step.CREATE_CERTIFICATE) is None and ran(result, Step.REGISTER_THING)
    described = iot_client(restarted.after).describe_certificate(
        certificateId=restarted.pending_certificate)
    assert described["certificateDescription"]["status"] == "ACTIVE"


# -- committed before acknowledged ----------------------------------------------------------------

def crash_image(data_dir: Path, image: Path) -> None:
    """What a crash at this instant leaves: the identity files and the registry's committed
    state (read through a separate SQLite connection, which sees only committed writes)."""
    image.mkdir(mode=0o700)
    for name in IDENTITY_FILES:
        shutil.copy2(data_dir / name, image / name)
    source = sqlite3.connect(f"file:{data_dir / 'registry.sqlite3'}?mode=ro", uri=True)
    target = sqlite3.connect(image / "registry.sqlite3")
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def test_register_thing_is_committed_before_the_device_hears_accepted(tmp_path: Path) -> None:
    # design principle 5; issue 2: "Writes are committed before they are acknowledged"
    data_dir, image = tmp_path / "data", tmp_path / "crash-image"
    with embedded(data_dir) as emu:
        iot = iot_client(emu.info)
        acknowledged = f"acked-{uuid.uuid4().hex[:8]}"
        iot.create_thing(thingName=acknowledged)
        fleet = new_fleet(emu.info, tmp_path / "fleet")
        claim = fleet.create_claim()

        def snapshot_on_accepted(step: str, _duration: float, error_code: str | None) -> None:
            if step == Step.REGISTER_THING.value and error_code is None:
                crash_image(data_dir, image)

        result = boot(device_inputs(emu.info, claim, fleet.template_name, "c",
                                    tmp_path / "device"),
                      stop_after=Step.REGISTER_THING, on_step=snapshot_on_accepted)
        assert result.stopped_at == Step.REGISTER_THING.value and image.is_dir()
    accepted = result.step(Step.REGISTER_THING)
    assert accepted is not None and accepted.ok
    thing_name = accepted.detail["thing_name"]  # what the device was told
    with embedded(image) as recovered:
        iot = iot_client(recovered.info)
        assert iot.describe_thing(thingName=acknowledged)["thingName"] == acknowledged
        principals = iot.list_thing_principals(thingName=thing_name)["principals"]
        assert [p.rsplit("/", 1)[1] for p in principals] == [result.certificate_id]
        described = iot.describe_certificate(certificateId=result.certificate_id)
        assert described["certificateDescription"]["status"] == "ACTIVE"


# -- two in one process ---------------------------------------------------------------------------

def test_two_embedded_emulators_in_one_process_do_not_share_state(tmp_path: Path) -> None:
    # issue 2: in-process emulators for tests; each is its own endpoint
    with embedded(None) as one, embedded(None) as two:
        a, b = one.info, two.info
        assert a.data_dir != b.data_dir and a.mqtt_port != b.mqtt_port
        assert Path(a.ca_file).read_bytes() != Path(b.ca_file).read_bytes()
        with pytest.raises(ssl.SSLCertVerificationError):  # each has its own CA
            tls_handshake(a, "localhost", b.ca_file)
        # registries
        thing = f"only-in-one-{uuid.uuid4().hex[:8]}"
        iot_client(a).create_thing(thingName=thing)
        assert thing in [t["thingName"] for t in iot_client(a).list_things()["things"]]
        assert thing not in [t["thingName"] for t in iot_client(b).list_things()["things"]]
        # brokers: the same client id on both, neither takes over the other's session
        # (spec broker §1.3: a second CONNECT with a client id drops the first)
        id_a = allowed_identity(a, tmp_path / "a")
        id_b = allowed_identity(b, tmp_path / "b")
        first = connected(a, id_a, "same-client-id")
        second = connected(b, id_b, "same-client-id")
        try:
            first.publish("dt/same-client-id/x", b"{}", qos=1, timeout=10)
            second.publish("dt/same-client-id/x", b"{}", qos=1, timeout=10)
            assert first.connected and second.connected
        finally:
            first.disconnect()
            second.disconnect()
        # clocks and observations
        admin_a, admin_b = AdminClient(a.api_url), AdminClient(b.api_url)
        offset_b = admin_b.clock().offset
        admin_a.advance(3600)
        assert admin_b.clock().offset == offset_b
        certs_b = {o.certificate_id for o in admin_b.events(kinds=[Kind.CONNECT])}
        certs_a = {o.certificate_id for o in admin_a.events(kinds=[Kind.CONNECT])}
        assert certs_a and certs_b and not certs_a & certs_b
        # stopping one leaves the other serving
        one.stop()
        assert refuses_connections(a.mqtt_port)
        assert iot_client(b).list_things()["things"] == []
