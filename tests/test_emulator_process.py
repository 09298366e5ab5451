"""``fleetbench emulator`` as a user runs it: a real subprocess, real clients.

Proves issue 2's command and its durability from the outside: ``endpoint.json`` and the
printed line, the CA and server certificate (TLS handshakes with :mod:`ssl`), file modes,
clean shutdown on SIGTERM/SIGINT, the temporary data dir, region and account in boto3's
ARNs, restart on the same data dir (CA, registry, device certificates, ownership tokens),
SIGKILL right after RegisterThing's ``accepted`` (design principle 5), bad options, and
the warning for a control plane exposed beyond loopback.

Each emulator runs in its own session (process group) so that a test can send Ctrl-C the
way a terminal does and so that cleanup reaches the key-pool workers it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices.base import (
    ClaimCredentials,
    DeviceResult,
    Step,
)
from harness import pki
from harness.endpoint_info import EndpointInfo
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

STARTUP_TIMEOUT = 30.0
KEY_POOL_SIZE = "2"  # the CLI's default (32 RSA keys) costs seconds of CPU at start
WARNING = "control plane exposed beyond loopback without --api-token"
REGION, ACCOUNT = "eu-central-1", "210987654321"


# -- the emulator process -------------------------------------------------------------------------

class EmulatorProcess:
    """One ``python -m harness.cli emulator ...``; stdout lines go to a queue, stderr to a
    file (so a chatty log can never fill a pipe and stall the emulator)."""

    def __init__(self, args: Sequence[str], workdir: Path, *,
                 env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / f"emulator-{uuid.uuid4().hex[:8]}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.printed: dict[str, Any] | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "emulator", *args],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, text=True,
            cwd=workdir, env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def ready(self, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """The JSON line printed once the endpoint listens."""
        deadline = time.monotonic() + timeout
        while self.printed is None:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no endpoint line within {timeout} s; stderr:\n"
                                     f"{self.stderr[-3000:]}") from None
            if line is None:
                raise AssertionError(f"emulator exited ({self.proc.wait()}) before listening; "
                                     f"stderr:\n{self.stderr[-3000:]}")
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict):
                    self.printed = data
        return self.printed

    @property
    def info(self) -> EndpointInfo:
        return EndpointInfo.from_dict(self.ready())

    def signal(self, sig: int) -> None:
        """To the emulator's own pid, as ``kill`` or a container runtime does."""
        os.kill(self.proc.pid, sig)

    def signal_group(self, sig: int) -> None:
        """To its whole process group, as a terminal does for Ctrl-C."""
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill whatever is left of the group this test started (key workers included).
        Only while the leader is not reaped: until then its pid, the group id, is ours."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def emulator_args(data_dir: Path | None, *extra: str) -> list[str]:
    args = ["--mqtt-port", "0", "--api-port", "0", "--key-pool-size", KEY_POOL_SIZE]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return args + list(extra)


Launch = Callable[..., EmulatorProcess]


@contextlib.contextmanager
def launcher(workdir: Path) -> Iterator[Launch]:
    started: list[EmulatorProcess] = []

    def launch(args: Sequence[str], env: dict[str, str] | None = None) -> EmulatorProcess:
        process = EmulatorProcess(args, workdir, env=env)
        started.append(process)
        return process

    try:
        yield launch
    finally:
        for process in started:
            process.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    with launcher(tmp_path / "runs") as start:
        yield start


def stop_cleanly(process: EmulatorProcess, sig: int = signal.SIGTERM) -> None:
    process.signal(sig)
    assert process.wait(STOP_TIMEOUT) == 0, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]


# -- one emulator for the read-only checks --------------------------------------------------------

@dataclass(frozen=True)
class Running:
    process: EmulatorProcess
    data_dir: Path
    info: EndpointInfo


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """An emulator with a data dir, a region, an account and two extra SANs."""
    base = tmp_path_factory.mktemp("running")
    data_dir = base / "data"
    with launcher(base) as start:
        process = start(emulator_args(data_dir, "--region", REGION, "--account-id", ACCOUNT,
                                      "--san", SAN_DNS, "--san", SAN_IP))
        yield Running(process, data_dir, process.info)


def test_endpoint_json_has_every_field_and_matches_the_printed_line(running: Running) -> None:
    # issue 2: endpoint.json written once listening, "and prints the same"
    path = running.data_dir / "endpoint.json"
    written = json.loads(path.read_text())
    assert written == running.process.printed
    assert set(REQUIRED_FIELDS) <= set(written)
    assert written["data_dir"] == str(running.data_dir)
    assert Path(written["ca_file"]).is_file()
    assert (written["region"], written["account_id"]) == (REGION, ACCOUNT)
    assert not path.with_name("endpoint.json.tmp").exists()  # written atomically
    assert EndpointInfo.read(path) == running.info


def test_port_0_picks_free_ports_that_the_endpoint_listens_on(running: Running) -> None:
    # issue 2: "Port 0 picks a free port"
    info = running.info
    assert info.mqtt_port > 0 and info.api_url.startswith("http://127.0.0.1:")
    api_port = int(info.api_url.rsplit(":", 1)[1])
    assert api_port > 0 and api_port != info.mqtt_port
    assert iot_client(info).list_things()["things"] is not None


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", SAN_DNS, SAN_IP])
def test_ca_file_verifies_the_server_certificate_for_each_of_its_names(
        running: Running, name: str) -> None:
    # issue 2: a server certificate for localhost, 127.0.0.1 and every --san, signed by
    # ca_file (spec broker §1.2: the emulator necessarily presents its own CA)
    presented = tls_handshake(running.info, name, running.info.ca_file)
    assert presented == pki.load_certificate((running.data_dir / "server.pem").read_bytes())


def test_the_server_certificate_does_not_verify_for_a_name_it_does_not_carry(
        running: Running) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(running.info, "not-a-san.fleetbench.test", running.info.ca_file)


def test_ca_file_signs_every_certificate_the_endpoint_issues(running: Running) -> None:
    # issue 2: ca_file is the root that signs "every certificate the endpoint issues"
    ca = pki.load_certificate(Path(running.info.ca_file).read_bytes())
    iot = iot_client(running.info)
    from_csr = certificate_from_csr(iot)[0]["certificatePem"]
    from_keys = iot.create_keys_and_certificate(setAsActive=False)["certificatePem"]
    for pem in (from_csr, from_keys):
        pki.load_certificate(pem).verify_directly_issued_by(ca)


def test_key_files_are_0600_and_the_data_dir_0700(running: Running) -> None:
    # issue 2: "kept in the data dir (keys 0600)"
    keys = sorted(running.data_dir.glob("*.key"))
    assert {"ca.key", "server.key"} <= {k.name for k in keys}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
    assert stat.S_IMODE(running.data_dir.stat().st_mode) == 0o700


def test_region_and_account_id_are_reflected_in_arns_returned_by_boto3(running: Running) -> None:
    # issue 2: --region / --account-id; spec broker §2.1, §5.1: arn:aws:iot:<region>:<account>:
    iot = iot_client(running.info)
    prefix = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
    name = f"arn-thing-{uuid.uuid4().hex[:8]}"
    assert iot.create_thing(thingName=name)["thingArn"] == f"{prefix}thing/{name}"
    policy = iot.create_policy(policyName=name, policyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
    assert policy["policyArn"] == f"{prefix}policy/{name}"
    made, _ = certificate_from_csr(iot)
    assert made["certificateArn"] == f"{prefix}cert/{made['certificateId']}"


def test_a_loopback_control_plane_prints_no_warning(running: Running) -> None:
    assert WARNING not in running.process.stderr


# -- stopping -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_shuts_it_down_cleanly_and_removes_its_temporary_data_dir(
        launch: Launch, tmp_path: Path, sig: int) -> None:
    # issue 2: foreground until SIGINT/SIGTERM, then a clean shutdown; without --data-dir
    # a fresh temporary directory, removed at exit
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = launch(emulator_args(None), env={"TMPDIR": str(tmp)})
    info = process.info
    data_dir = Path(info.data_dir)
    assert data_dir.parent == tmp and (data_dir / "endpoint.json").is_file()
    assert Path(info.ca_file).parent == data_dir
    started = time.monotonic()
    stop_cleanly(process, sig)
    assert time.monotonic() - started < STOP_TIMEOUT
    assert not data_dir.exists()
    assert refuses_connections(info.mqtt_port)
    assert refuses_connections(int(info.api_url.rsplit(":", 1)[1]))


def test_ctrl_c_in_a_terminal_stops_it_without_a_traceback(launch: Launch,
                                                          tmp_path: Path) -> None:
    # issue 2: Ctrl-C sends SIGINT to the whole foreground process group
    process = launch(emulator_args(tmp_path / "data"))
    process.ready()
    process.signal_group(signal.SIGINT)
    assert process.wait(STOP_TIMEOUT) == 0
    assert "Traceback" not in process.stderr, process.stderr[-3000:]


# -- restart on the same data dir -----------------------------------------------------------------

@dataclass(frozen=True)
class Restarted:
    """What existed before a clean restart, and the emulator after it."""

    data_dir: Path
    before: EndpointInfo
    after: EndpointInfo
    files: dict[str, bytes]
    old_ca_copy: Path
    fleet_template: str
    claim: ClaimCredentials
    thing: str
    policy: str
    active_certificate: str
    inactive_certificate: str
    registered: DeviceResult  # fully provisioned before the restart
    registered_dir: Path
    pending_dir: Path  # holds a certificate and an unused ownership token
    pending_certificate: str


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restarted]:
    base = tmp_path_factory.mktemp("restart")
    data_dir = base / "data"
    with launcher(base) as start:
        first = start(emulator_args(data_dir))
        before = first.info
        iot = iot_client(before)
        # a device provisioned end to end, and one stopped once its token is in flash
        devices = provision_two(before, base)
        pending = devices.pending
        assert pending.stopped_at == Step.SAVE_CREDENTIALS.value and pending.certificate_id
        # things, policies and certificates made through the control plane
        thing, policy = f"kept-{uuid.uuid4().hex[:8]}", f"kept-policy-{uuid.uuid4().hex[:8]}"
        iot.create_thing(thingName=thing, attributePayload={"attributes": {"colour": "teal"}})
        iot.create_policy(policyName=policy, policyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Publish", "Resource": "*"}]}))
        active, _ = certificate_from_csr(iot)
        iot.attach_policy(policyName=policy, target=active["certificateArn"])
        iot.attach_thing_principal(thingName=thing, principal=active["certificateArn"])
        inactive, _ = certificate_from_csr(iot)
        iot.update_certificate(certificateId=inactive["certificateId"], newStatus="INACTIVE")
        files = {name: (data_dir / name).read_bytes()
                 for name in ("ca.pem", "ca.key", "server.pem", "server.key")}
        old_ca_copy = base / "ca-before-restart.pem"
        old_ca_copy.write_bytes(files["ca.pem"])
        stop_cleanly(first)
        second = start(emulator_args(data_dir))
        yield Restarted(
            data_dir=data_dir, before=before, after=second.info, files=files,
            old_ca_copy=old_ca_copy, fleet_template=devices.fleet.template_name,
            claim=devices.claim, thing=thing, policy=policy,
            active_certificate=active["certificateId"],
            inactive_certificate=inactive["certificateId"], registered=devices.registered,
            registered_dir=devices.registered_dir, pending_dir=devices.pending_dir,
            pending_certificate=pending.certificate_id)


def test_restart_reuses_the_ca_and_the_server_certificate(restarted: Restarted) -> None:
    # issue 2: CA and server certificate "kept in the data dir ... and reused on restart"
    for name, content in restarted.files.items():
        assert (restarted.data_dir / name).read_bytes() == content, name
    presented = tls_handshake(restarted.after, "localhost", restarted.old_ca_copy)
    assert pki.certificate_pem(presented).encode() == restarted.files["server.pem"]


def test_restart_keeps_things_policies_and_certificates(restarted: Restarted) -> None:
    # issue 2: "Restarting the emulator on the same data dir keeps everything"
    iot = iot_client(restarted.after)
    thing = iot.describe_thing(thingName=restarted.thing)
    assert thing["attributes"] == {"colour": "teal"}
    document = json.loads(iot.get_policy(policyName=restarted.policy)["policyDocument"])
    assert document["Statement"][0]["Action"] == "iot:Publish"
    active = iot.describe_certificate(certificateId=restarted.active_certificate)
    assert active["certificateDescription"]["status"] == "ACTIVE"
    inactive = iot.describe_certificate(certificateId=restarted.inactive_certificate)
    assert inactive["certificateDescription"]["status"] == "INACTIVE"  # spec broker §2.3
    arn = active["certificateDescription"]["certificateArn"]
    assert iot.list_thing_principals(thingName=restarted.thing)["principals"] == [arn]
    attached = iot.list_attached_policies(target=arn)["policies"]
    assert [p["policyName"] for p in attached] == [restarted.policy]
    template = iot.describe_provisioning_template(templateName=restarted.fleet_template)
    assert template["enabled"] is True
    provisioned = iot.describe_thing(thingName=restarted.registered.thing_name)
    assert provisioned["thingName"] == restarted.registered.thing_name


def test_a_device_certificate_issued_before_a_restart_still_connects_and_publishes(
        restarted: Restarted) -> None:
    # issue 2 + design principle 5: what a device was given survives the restart
    before = restarted.registered
    assert before.thing_name is not None
    result = boot(device_inputs(restarted.after, restarted.claim, restarted.fleet_template,
                                "a", restarted.registered_dir))
    assert result.ok, result.failure or result.error
    assert result.step(Step.CONNECT_CLAIM) is None  # it only used its own certificate
    assert ran(result, Step.CONNECT_DEVICE) and ran(result, Step.PUBLISH_TELEMETRY)
    assert result.thing_name == before.thing_name


def test_an_ownership_token_issued_before_a_restart_still_registers_the_thing(
        restarted: Restarted) -> None:
    # spec fleet §1.6 (token valid for an hour) across an emulator restart
    result = boot(device_inputs(restarted.after, restarted.claim, restarted.fleet_template,
                                "b", restarted.pending_dir))
    assert result.ok, result.failure or result.error
    assert result.step(Step.CREATE_CERTIFICATE) is None  # it reused the stored token
    assert ran(result, Step.REGISTER_THING) and ran(result, Step.PUBLISH_TELEMETRY)
    iot = iot_client(restarted.after)
    assert result.thing_name is not None
    principals = iot.list_thing_principals(thingName=result.thing_name)["principals"]
    assert [p.rsplit("/", 1)[1] for p in principals] == [restarted.pending_certificate]
    described = iot.describe_certificate(certificateId=restarted.pending_certificate)
    assert described["certificateDescription"]["status"] == "ACTIVE"


# -- killed -------------------------------------------------------------------------------------

def test_sigkill_right_after_register_thing_accepted_loses_nothing_the_device_was_told(
        launch: Launch, tmp_path: Path) -> None:
    # design principle 5: committed before the device is told it succeeded; issue 2:
    # "Writes are committed before they are acknowledged"
    data_dir = tmp_path / "data"
    first = launch(emulator_args(data_dir))
    info = first.info
    iot = iot_client(info)
    acknowledged = f"acked-{uuid.uuid4().hex[:8]}"
    iot.create_thing(thingName=acknowledged)  # a control-plane write, acknowledged
    fleet = new_fleet(info, tmp_path / "fleet")
    claim = fleet.create_claim()
    killed = threading.Event()

    def kill_on_accepted(step: str, _duration: float, error_code: str | None) -> None:
        if step == Step.REGISTER_THING.value and error_code is None:
            first.signal(signal.SIGKILL)  # the device has just parsed `accepted`
            killed.set()

    inputs = device_inputs(info, claim, fleet.template_name, "k", tmp_path / "device")
    result = boot(inputs, stop_after=Step.REGISTER_THING, on_step=kill_on_accepted)
    assert killed.is_set() and result.stopped_at == Step.REGISTER_THING.value
    assert result.certificate_id is not None
    assert first.wait() == -signal.SIGKILL
    accepted = result.step(Step.REGISTER_THING)
    assert accepted is not None and accepted.ok
    thing_name = accepted.detail["thing_name"]  # what RegisterThing's `accepted` named
    assert thing_name == fleet.thing_name("k")

    second = launch(emulator_args(data_dir))
    after = second.info
    iot = iot_client(after)
    assert iot.describe_thing(thingName=acknowledged)["thingName"] == acknowledged
    assert iot.describe_thing(thingName=thing_name)["thingName"] == thing_name
    principals = iot.list_thing_principals(thingName=thing_name)["principals"]
    assert [p.rsplit("/", 1)[1] for p in principals] == [result.certificate_id]
    described = iot.describe_certificate(certificateId=result.certificate_id)
    assert described["certificateDescription"]["status"] == "ACTIVE"
    # the device, rebooted, finds its token spent (spec fleet §1.6: no reuse, across a kill
    # too) and its certificate working; it connects with its thing name as client id, as
    # the template's policy requires
    rebooted = boot(device_inputs(after, claim, fleet.template_name, "k", tmp_path / "device"),
                    client_id=thing_name)
    assert rebooted.ok, rebooted.failure or rebooted.error
    assert ran(rebooted, Step.PROBE_DEVICE) and ran(rebooted, Step.PUBLISH_TELEMETRY)
    assert rebooted.step(Step.CREATE_CERTIFICATE) is None
    assert rebooted.certificate_id == result.certificate_id


# -- bad usage ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--mqtt-port", "-5"], "argument --mqtt-port: expected a port 0-65535 (0 = a free port), "
                            "got '-5'"),
    (["--hook", "nonsense"], "argument --hook: --hook expects ARN=TARGET, got 'nonsense'"),
    (["--hook", "arn:aws:lambda:us-east-1:123456789012:function:f=ftp://x"],
     "argument --hook: unknown hook target kind"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
], ids=["negative-port", "hook-without-target", "hook-bad-target", "unknown-option"])
def test_bad_options_exit_2_with_a_clear_message(tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    data_dir = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "emulator", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert not (data_dir / "endpoint.json").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--api-port", "65536"], "argument --api-port: expected a port 0-65535"),
    (["--mqtt-port", "http"], "argument --mqtt-port: expected a port 0-65535"),
    (["--key-pool-size", "0"], "argument --key-pool-size: expected a whole number of at least 1"),
])
def test_out_of_range_numbers_are_refused_by_the_parser(
        capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    # the same parser as the subprocess above, without an interpreter start per case
    from harness.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["emulator", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_port_already_in_use_exits_2_with_a_clear_message(launch: Launch,
                                                            tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = launch(["--mqtt-port", str(port), "--api-port", "0", "--key-pool-size", "1",
                          "--data-dir", str(tmp_path / "data")])
        assert process.wait(STARTUP_TIMEOUT) == 2
    assert "cannot listen" in process.stderr
    assert "address already in use" in process.stderr.lower()
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    assert process.lines.get(timeout=5) is None  # nothing printed
    assert not (tmp_path / "data" / "endpoint.json").exists()


def test_a_data_dir_that_is_a_file_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "emulator", "--data-dir", str(not_a_dir)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "cannot use the data dir" in done.stderr and str(not_a_dir) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_control_plane_beyond_loopback_without_a_token_prints_the_warning(
        launch: Launch, tmp_path: Path) -> None:
    # issue 2 / design: --api-host beyond loopback should carry --api-token
    process = launch(emulator_args(tmp_path / "data", "--api-host", "0.0.0.0"))
    info = process.info
    assert f"fleetbench: warning: {WARNING}" in process.stderr
    assert info.api_url.startswith("http://127.0.0.1:")
    assert iot_client(info).list_things()["things"] == []
    stop_cleanly(process)
