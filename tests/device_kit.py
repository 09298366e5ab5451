"""Shared pieces of the tests that run devices against a running endpoint.

* for the device adapter tests (``test_process_device``, ``test_sdk_device``,
  ``test_serial_device``, ``test_provision_cli``), which use the fleetbench plugin's
  fixtures: :func:`run_inputs` and :func:`disabled_fleet_fixture`;
* for the emulator tests (``test_emulator_embedded``, ``test_emulator_process``), which
  start emulators of their own: boto3 on the control plane (:func:`iot_client`), checks of
  the MQTT port (:func:`tls_handshake`, :func:`refuses_connections`), a fleet made through
  boto3 (:func:`new_fleet`), virtual-device boots (:func:`device_inputs`, :func:`boot`,
  :func:`ran`) and the devices a restart must not forget (:func:`provision_two`).
"""

from __future__ import annotations

import functools
import secrets
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from devices.base import (
    CertApi,
    ClaimCredentials,
    DeviceInputs,
    DeviceResult,
    EndpointParams,
    Step,
)
from devices.virtual import StepControl, VirtualDevice, VirtualOptions
from harness import pki
from harness.endpoint_info import EndpointInfo
from harness.fleet import SERIAL_PARAMETER, Fleet, FleetSpec

#: What endpoint.json must hold at least (issue 2).
REQUIRED_FIELDS = ("mqtt_host", "mqtt_port", "api_url", "ca_file", "region", "account_id",
                   "data_dir")
#: "shuts down cleanly" within a few seconds of being stopped (issue 2).
STOP_TIMEOUT = 5.0
#: Extra names for the server certificate (issue 2: ``--san``).
SAN_DNS, SAN_IP = "gateway.fleetbench.test", "10.77.0.9"


# --------------------------------------------------------------------------- device adapters


def run_inputs(fleet: Fleet, endpoint_params: EndpointParams, claim: ClaimCredentials,
               tmp_path: Path, **overrides: object) -> DeviceInputs:
    """Inputs for one run of a fresh device (a new serial and workdir) in ``fleet``."""
    serial = str(overrides.pop("serial", f"sn{secrets.token_hex(4)}"))
    values: dict[str, object] = {
        "endpoint": endpoint_params, "claim": claim, "template_name": fleet.template_name,
        "flow": "trusted-user" if claim.temporary else "claim",
        "parameters": {SERIAL_PARAMETER: serial}, "serial": serial,
        "client_id": f"{serial}-claim", "workdir": tmp_path / serial, "timeout_s": 60}
    values.update(overrides)
    return DeviceInputs(**values)  # type: ignore[arg-type]


def disabled_fleet_fixture(suffix: str) -> Any:
    """The module-scoped ``disabled_fleet`` fixture: a fleet whose template is disabled, so
    RegisterThing is rejected (spec fleet §1.4 step 3); its prefix is the run's plus
    ``suffix``. In a test module: ``disabled_fleet = disabled_fleet_fixture("-pd")``."""

    @pytest.fixture(scope="module", name="disabled_fleet")
    def _disabled_fleet(endpoint: Any, fleetbench_prefix: str,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
        fleet = Fleet.for_endpoint(endpoint, FleetSpec(prefix=f"{fleetbench_prefix}{suffix}",
                                                       enabled=False,
                                                       workdir=tmp_path_factory.mktemp("off")))
        fleet.setup()
        yield fleet
        fleet.teardown()

    return _disabled_fleet


# --------------------------------------------------------------------------- emulators


@functools.lru_cache(maxsize=1)
def _session() -> Any:
    import boto3

    return boto3.Session()  # one session: botocore's service model is loaded once


def iot_client(info: EndpointInfo) -> Any:
    """boto3's ``iot`` client on the emulator's control plane, as any user builds one."""
    return _session().client("iot", endpoint_url=info.api_url, region_name=info.region,
                             aws_access_key_id="AKIDFLEETBENCHTEST",
                             aws_secret_access_key="fleetbench-test")


def tls_handshake(info: EndpointInfo, server_hostname: str,
                  ca_file: Path | str) -> x509.Certificate:
    """A TLS handshake to the MQTT port verifying the server certificate against ``ca_file``
    for ``server_hostname``; returns the certificate the server presented."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((info.mqtt_host, info.mqtt_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def certificate_from_csr(iot: Any, *, active: bool = True) -> tuple[dict[str, Any], str]:
    """A certificate made through boto3 and its private key (PEM)."""
    key = pki.generate_ec_key()
    made: dict[str, Any] = iot.create_certificate_from_csr(
        certificateSigningRequest=pki.make_csr(key), setAsActive=active)
    return made, pki.private_key_pem(key)


def new_fleet(info: EndpointInfo, workdir: Path) -> Fleet:
    """A provisioning template and claim policy made through boto3 (harness.fleet)."""
    spec = FleetSpec(prefix=f"fb{uuid.uuid4().hex[:6]}", workdir=workdir)
    return Fleet(iot_client(info), spec, region=info.region, account_id=info.account_id).setup()


def device_inputs(info: EndpointInfo, claim: ClaimCredentials, template: str, serial: str,
                  workdir: Path) -> DeviceInputs:
    return DeviceInputs(endpoint=EndpointParams.from_endpoint_info(info), claim=claim,
                        template_name=template, cert_api=CertApi.CSR, serial=serial,
                        workdir=workdir, timeout_s=30.0)


def boot(inputs: DeviceInputs, *, stop_after: Step | None = None,
         on_step: Callable[[str, float, str | None], None] | None = None,
         client_id: str | None = None) -> DeviceResult:
    """One boot of a virtual device (a later boot with the same workdir is a reboot);
    ``client_id`` is the one its own certificate connects with (default the thing name)."""
    options = VirtualOptions(rng_seed=7, control=StepControl(stop_after=stop_after),
                             on_step=on_step, device_client_id=client_id)
    return VirtualDevice(options).provision(inputs)


def ran(result: DeviceResult, step: Step) -> bool:
    """Whether ``result`` has ``step`` and it worked."""
    record = result.step(step)
    return record is not None and record.ok


@dataclass(frozen=True)
class TwoDevices:
    """A fleet, one device provisioned end to end and one stopped with its token in flash."""

    fleet: Fleet
    claim: ClaimCredentials
    registered: DeviceResult
    registered_dir: Path
    pending: DeviceResult  # holds a certificate and an unused ownership token
    pending_dir: Path


def provision_two(info: EndpointInfo, base: Path) -> TwoDevices:
    """A new fleet under ``base``; device "a" provisioned end to end (it must succeed), and
    device "b" stopped right after saving its credentials."""
    fleet = new_fleet(info, base / "fleet")
    claim = fleet.create_claim()
    registered_dir, pending_dir = base / "device-a", base / "device-b"
    registered = boot(device_inputs(info, claim, fleet.template_name, "a", registered_dir))
    assert registered.ok, registered.failure or registered.error
    pending = boot(device_inputs(info, claim, fleet.template_name, "b", pending_dir),
                   stop_after=Step.SAVE_CREDENTIALS)
    return TwoDevices(fleet, claim, registered, registered_dir, pending, pending_dir)
