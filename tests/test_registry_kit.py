"""Helpers shared by the registry tests (no tests here): a throwaway CA, registries on
temporary files, fast EC certificates, and a wire serialiser that walks botocore's
output shapes the way the control plane does."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from botocore import xform_name
from botocore.model import Shape
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from harness import pki
from harness.clock import Clock
from harness.emulator.registry import Registry, RegistryEvent, RegistrySettings
from harness.emulator.registry.validation import operation_model

REGION = "us-east-1"
ACCOUNT = "123456789012"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]})


@functools.cache
def emulator_ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create()


def make_registry(path: Path, *, clock: Clock | None = None,
                  settings: RegistrySettings | None = None, **kwargs: Any) -> Registry:
    return Registry(path, region=REGION, account_id=ACCOUNT, clock=clock or Clock(),
                    ca=emulator_ca(), settings=settings, **kwargs)


@pytest.fixture(name="path")
def registry_file(tmp_path: Path) -> Path:
    """Fixture ``path``: the registry's SQLite file, for tests that reopen it (import this
    function into a test module to use it)."""
    return tmp_path / "registry.db"


@pytest.fixture(name="registry")
def file_registry(path: Path) -> Iterator[Registry]:
    """Fixture ``registry``: a registry on ``path``, closed after the test."""
    reg = make_registry(path)
    yield reg
    reg.close()


def reopen(registry: Registry, path: Path) -> Registry:
    """Close ``registry`` and open the same file again (what a restarted emulator does)."""
    registry.close()
    return make_registry(path, clock=registry.clock, settings=registry.settings)


def device_pem(ca: pki.CertificateAuthority | None = None, common_name: str = "device") -> str:
    """A certificate for a fresh EC key, signed by ``ca`` (default: a one-off CA)."""
    issuer = ca or pki.CertificateAuthority.create()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return pki.certificate_pem(
        issuer.issue_device_certificate(pki.generate_ec_key().public_key(), subject))


def verification_pem(ca: pki.CertificateAuthority, common_name: str) -> str:
    """A verification certificate for RegisterCACertificate (CN = registration code)."""
    return device_pem(ca, common_name)


def make_ca_pem(common_name: str) -> tuple[pki.CertificateAuthority, str]:
    ca = pki.CertificateAuthority.create(common_name)
    return ca, ca.pem


def self_signed_pem(common_name: str = "sni device") -> str:
    return pki.certificate_pem(pki.self_signed_certificate(pki.generate_ec_key(), common_name))


def csr_pem(key: pki.PrivateKey, common_name: str = "csr device") -> str:
    return pki.make_csr(key, common_name)


def tampered_csr_pem() -> str:
    """A well-formed CSR whose subject was changed after signing (bad signature)."""
    pem = pki.make_csr(pki.generate_ec_key(), "tamper-me-aaaa")
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(der.replace(b"tamper-me-aaaa", b"tamper-me-bbbb"))
    return forged.public_bytes(serialization.Encoding.PEM).decode()


class EventLog:
    """A listener that keeps every event."""

    def __init__(self) -> None:
        self.events: list[RegistryEvent] = []

    def __call__(self, event: RegistryEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind.value for e in self.events]

    def clear(self) -> None:
        self.events.clear()



def _member(obj: Any, name: str) -> Any:
    snake = xform_name(name)
    if isinstance(obj, dict):
        for key in (snake, name):
            if key in obj:
                return obj[key]
        return None
    return getattr(obj, snake, None)


def to_wire(shape: Shape, value: Any) -> Any:
    """Serialise an operation result by walking botocore's output shape, as the control
    plane does (attribute or key = snake_case of the member; enums by value)."""
    if value is None:
        return None
    kind = shape.type_name
    if kind == "structure":
        out = {}
        for name, member in shape.members.items():
            sub = to_wire(member, _member(value, name))
            if sub is not None:
                out[name] = sub
        return out
    if kind == "list":
        return [to_wire(shape.member, v) for v in value]
    if kind == "map":
        return {k: to_wire(shape.value, v) for k, v in value.items()}
    if isinstance(value, Enum):
        return value.value
    if kind == "timestamp":
        assert isinstance(value, (int, float)), (shape.name, value)
        return float(value)
    return value


def wire_output(operation: str, result: Any) -> dict[str, Any]:
    """``result`` as botocore would receive it, parsed back by botocore's own parser."""
    from botocore.parsers import RestJSONParser

    model = operation_model(operation)
    if model.output_shape is None:
        assert result is None
        return {}
    body = to_wire(model.output_shape, result) or {}
    parsed = RestJSONParser().parse(
        {"status_code": 200, "headers": {}, "body": json.dumps(body).encode()},
        model.output_shape)
    parsed.pop("ResponseMetadata", None)
    return parsed


def raises_message(fn: Callable[[], Any], exc_type: type[BaseException]) -> str:
    try:
        fn()
    except exc_type as exc:
        return str(getattr(exc, "message", exc))
    raise AssertionError(f"{exc_type.__name__} not raised")
