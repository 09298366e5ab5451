"""Helpers shared by the provisioning tests (no tests here): an embedded emulator, claim
identities (by claim and by trusted user), paho-mqtt devices that run the fleet
provisioning MQTT API, templates, and checks that a rejection left nothing behind.

Everything goes through public entry points: the emulator's MQTT port over mutual TLS,
its registry as the control plane's backend, boto3 against its control plane.
"""

from __future__ import annotations

import functools
import json
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import pki, protocol
from harness.emulator.app import EmbeddedEmulator, EmulatorConfig
from harness.emulator.registry import CertificateStatus, Registry
from harness.protocol import Api, ErrorResponse, PayloadFormat

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE_ARN = "arn:aws:iam::123456789012:role/provisioning-role"
HOOK_ARN = "arn:aws:lambda:us-east-1:123456789012:function:pre-provisioning-hook"
FIXTURES = Path(__file__).parent / "fixtures" / "templates"
TIMEOUT = 10.0

#: A device policy shared by every provisioned device: connect as its thing, publish on its
#: own telemetry topic (a policy variable, so one inline policy serves the whole fleet).
DEVICE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish",
         "Resource": f"arn:aws:iot:{REGION}:{ACCOUNT}:topic/telemetry/"
                     "${iot:Connection.Thing.ThingName}"},
    ],
}


def fleet_template(*, status: str = "ACTIVE", thing_groups: list[str] | None = None,
                   overrides: Mapping[str, str] | None = None,
                   policy_name: str | None = None) -> dict[str, Any]:
    """A template like the guide's: thing ``dev-<SerialNumber>``, the certificate, a policy."""
    thing: dict[str, Any] = {
        "Type": "AWS::IoT::Thing",
        "Properties": {
            "ThingName": {"Fn::Join": ["", ["dev-", {"Ref": "SerialNumber"}]]},
            "AttributePayload": {"serial": {"Ref": "SerialNumber"}},
        },
    }
    if thing_groups is not None:
        thing["Properties"]["ThingGroups"] = thing_groups
    if overrides is not None:
        thing["OverrideSettings"] = dict(overrides)
    policy: dict[str, Any] = ({"PolicyName": policy_name} if policy_name is not None
                              else {"PolicyDocument": DEVICE_POLICY})
    return {
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Location": {"Type": "String", "Default": "factory"},
            "AWS::IoT::Certificate::Id": {"Type": "String"},
        },
        "Resources": {
            "thing": thing,
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                               "Status": status},
            },
            "policy": {"Type": "AWS::IoT::Policy", "Properties": policy},
        },
        "DeviceConfiguration": {
            "serial": {"Ref": "SerialNumber"},
            "location": {"Ref": "Location"},
        },
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- the emulator ---------------------------------------------------------------------------------

@contextmanager
def running_emulator(**overrides: Any) -> Iterator[EmbeddedEmulator]:
    config = EmulatorConfig(mqtt_port=0, api_port=0, key_pool_size=overrides.pop(
        "key_pool_size", 3), key_pool_workers=1, **overrides)
    emu = EmbeddedEmulator(config)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def registry_of(emu: EmbeddedEmulator) -> Registry:
    return emu.emulator.registry  # type: ignore[no-any-return]


def service_of(emu: EmbeddedEmulator) -> Any:
    return emu.emulator.provisioning


def create_template(emu: EmbeddedEmulator, body: Mapping[str, Any] | str, *,
                    name: str | None = None, enabled: bool = True,
                    hook_arn: str | None = None) -> str:
    name = name or unique("tpl")
    text = body if isinstance(body, str) else json.dumps(body)
    hook = {"targetArn": hook_arn, "payloadVersion": "2020-04-01"} if hook_arn else None
    registry_of(emu).create_provisioning_template(
        template_name=name, template_body=text, provisioning_role_arn=ROLE_ARN,
        enabled=enabled, pre_provisioning_hook=hook)
    return name


@functools.lru_cache(maxsize=8)
def _boto3_client(api_url: str) -> Any:
    import boto3

    return boto3.client("iot", endpoint_url=api_url, region_name=REGION,
                        aws_access_key_id="AKIDFLEETBENCH", aws_secret_access_key="secret")


def boto3_client(emu: EmbeddedEmulator) -> Any:
    """A boto3 ``iot`` client on the emulator's control plane (one per emulator)."""
    return _boto3_client(emu.info.api_url)


# -- identities -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Files a device connects with; ``certificate_id`` is AWS's id of the certificate."""

    certificate_id: str
    cert_file: Path
    key_file: Path
    ca_file: Path


def write_identity(directory: Path, certificate_pem: str, private_key_pem: str,
                   ca_file: str | Path) -> Identity:
    name = uuid.uuid4().hex[:12]
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    pki.write_public(cert_file, certificate_pem)
    pki.write_secret(key_file, private_key_pem)
    return Identity(pki.certificate_id(certificate_pem), cert_file, key_file, Path(ca_file))


def factory_claim(emu: EmbeddedEmulator, directory: Path, template: str,
                  document: Mapping[str, Any] | None = None) -> Identity:
    """A claim certificate as a factory has one: registered, ACTIVE, with the guide's claim
    policy (both certificate paths) or ``document``, made through boto3 like against AWS."""
    iot = boto3_client(emu)
    key = pki.generate_ec_key()  # a CSR keeps it fast; the claim is what matters
    made = iot.create_certificate_from_csr(certificateSigningRequest=pki.make_csr(key),
                                           setAsActive=True)
    policy_name = unique("claim-policy")
    if document is None:
        document = protocol.claim_policy_document(template, region=REGION, account_id=ACCOUNT)
    iot.create_policy(policyName=policy_name, policyDocument=json.dumps(document))
    iot.attach_policy(policyName=policy_name, target=made["certificateArn"])
    return write_identity(directory, made["certificatePem"], pki.private_key_pem(key),
                          emu.info.ca_file)


def trusted_user_claim(emu: EmbeddedEmulator, directory: Path, template: str, *,
                       via_boto3: bool = False) -> Identity:
    """A temporary claim from CreateProvisioningClaim (Python, or boto3's control plane)."""
    if via_boto3:
        claim = boto3_client(emu).create_provisioning_claim(templateName=template)
        return write_identity(directory, claim["certificatePem"],
                              claim["keyPair"]["PrivateKey"], emu.info.ca_file)
    made = service_of(emu).create_provisioning_claim(template)
    return write_identity(directory, made.certificate_pem, made.key_pair.private_key,
                          emu.info.ca_file)


def claim_identity(emu: EmbeddedEmulator, directory: Path, template: str, by: str) -> Identity:
    if by == "claim":
        return factory_claim(emu, directory, template)
    return trusted_user_claim(emu, directory, template)


# -- a paho-mqtt device ---------------------------------------------------------------------------

class Refused(Exception):
    """The connection was refused or closed."""


class PahoDevice:
    """paho-mqtt 2 (3.1.1 or 5) over mutual TLS, TCP_NODELAY, events as queues."""

    def __init__(self, emu: EmbeddedEmulator, identity: Identity, client_id: str, *,
                 version: int = 4) -> None:
        import paho.mqtt.client as mqtt

        self.version = version
        protocol_version = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id,
                                  protocol=protocol_version, reconnect_on_failure=False)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(identity.ca_file))
        ctx.load_cert_chain(str(identity.cert_file), str(identity.key_file))
        ctx.check_hostname = False
        self.client.tls_set_context(ctx)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected: queue.Queue[int] = queue.Queue()
        self.disconnected = threading.Event()
        self._acks: dict[int, threading.Event] = {}
        self._codes: dict[int, list[int]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        try:
            self.client.connect("127.0.0.1", emu.info.mqtt_port, 60)
        except (OSError, ssl.SSLError) as exc:
            raise Refused(str(exc)) from None
        sock: Any = self.client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        try:
            code = self.connected.get(timeout=TIMEOUT)
        except queue.Empty:
            self.close()
            raise Refused("no CONNACK") from None
        if code != 0:
            self.close()
            raise Refused(f"CONNACK {code}")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.put(int(getattr(reason, "value", reason)))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnected.set()
        self.connected.put(-1)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._codes[mid] = [int(getattr(reason, "value", reason or 0))]
        self._acks.setdefault(mid, threading.Event()).set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        self._codes[mid] = [int(getattr(c, "value", c)) for c in codes]
        self._acks.setdefault(mid, threading.Event()).set()

    def _wait(self, mid: int, what: str) -> list[int]:
        event = self._acks.setdefault(mid, threading.Event())
        deadline = time.monotonic() + TIMEOUT
        while not event.wait(0.05):
            if self.disconnected.is_set():
                raise Refused(f"disconnected while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what}")
        return self._codes.get(mid, [])

    def subscribe(self, *filters: str) -> list[int]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None
        return self._wait(mid, "SUBACK")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> int:
        """Publish and wait for PUBACK; returns its reason code (0 on 3.1.1)."""
        info = self.client.publish(topic, payload, qos)
        if qos == 0:
            return 0
        return self._wait(info.mid, "PUBACK")[0]

    def expect(self, timeout: float = TIMEOUT) -> tuple[str, bytes]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no message") from None

    def call(self, api: Api, fmt: PayloadFormat | str, payload: bytes,
             template: str | None = None) -> Any:
        """Subscribe to accepted/rejected, publish the request, parse the single answer."""
        accepted, rejected = protocol.subscription_filters(api, fmt, template)
        self.subscribe(accepted, rejected)
        self.publish(protocol.request_topic(api, fmt, template), payload)
        topic, body = self.expect()
        parsed = protocol.parse_topic(topic)
        assert parsed is not None and parsed.suffix is not None, topic
        return protocol.parse_response(api, parsed.suffix, body, fmt)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# -- flows ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NewCertificate:
    certificate_id: str
    certificate_pem: str
    private_key_pem: str
    token: str


def create_certificate(device: PahoDevice, path: str, fmt: str) -> NewCertificate:
    """CreateKeysAndCertificate (``path="keys"``) or CreateCertificateFromCsr (``"csr"``)."""
    if path == "keys":
        answer = device.call(Api.CREATE_KEYS_AND_CERTIFICATE, fmt, b"" if fmt == "cbor" else b"{}")
        assert not isinstance(answer, ErrorResponse), answer
        return NewCertificate(answer.certificate_id, answer.certificate_pem, answer.private_key,
                              answer.certificate_ownership_token)
    key = pki.generate_ec_key()
    request = protocol.CreateCertificateFromCsrRequest(pki.make_csr(key))
    answer = device.call(Api.CREATE_CERTIFICATE_FROM_CSR, fmt, protocol.encode(request, fmt))
    assert not isinstance(answer, ErrorResponse), answer
    return NewCertificate(answer.certificate_id, answer.certificate_pem,
                          pki.private_key_pem(key), answer.certificate_ownership_token)


def register(device: PahoDevice, template: str, fmt: str, token: str,
             parameters: Mapping[str, str] | None = None) -> Any:
    request = protocol.RegisterThingRequest(token, dict(parameters or {}))
    return device.call(Api.REGISTER_THING, fmt, protocol.encode(request, fmt), template)


# -- what a rejection must leave behind -----------------------------------------------------------

def account_state(emu: EmbeddedEmulator) -> dict[str, set[Any]]:
    dump = registry_of(emu).dump()
    return {name: set(rows) for name, rows in dump.items()}


def assert_nothing_left(emu: EmbeddedEmulator, before: dict[str, set[Any]],
                        certificate_id: str | None) -> None:
    """No new thing, policy or attachment; the certificate (if any) still PENDING_ACTIVATION."""
    after = account_state(emu)
    for table in ("things", "policies", "policy_targets", "thing_principals", "group_members"):
        assert after[table] == before[table], f"{table} changed"
    if certificate_id is not None:
        cert = registry_of(emu).get_certificate(certificate_id)
        assert cert is not None and cert.status is CertificateStatus.PENDING_ACTIVATION


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmbeddedEmulator]:
    """One emulator per test module; tests use unique names and do not depend on order."""
    with running_emulator() as emu:
        yield emu
