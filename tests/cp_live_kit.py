"""Shared pieces of the live control-plane tests (issue 4, "Proven").

Each ``tests/test_cp_live_*.py`` module runs boto3 against one running
:class:`~harness.emulator.app.EmbeddedEmulator` of its own (module scope: one start
per module, not per test), exactly as a team's setup script would: the only change
from a script written for AWS is ``endpoint_url``. What is here:

* :func:`emulator_fixture` makes the module's ``live`` fixture (a :class:`Live`);
* :func:`unique` gives names no other test uses, so tests do not depend on each other
  or on their order;
* :func:`check_output` / :func:`assert_members` compare a response with botocore's
  output shape of the operation (member names, member types, timestamps as datetimes);
* :func:`unchanged` asserts that a failed call changed nothing, reading the state back
  through boto3 and through the registry's committed records;
* the AWS developer guide's fixtures (template, hook) and the documented claim policy.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.model import Shape

from harness import pki
from harness.emulator.app import EmbeddedEmulator, EmulatorConfig

REGION = "us-east-1"
ACCOUNT = "123456789012"
ARN_PREFIX = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
#: The guide's example role (fleet §3.6: any 20-2048 character ARN is accepted).
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/Provisioning_FleetProvisioningRole"
#: One attempt: an error reaches the test at once instead of after boto3's retries.
NO_RETRIES = Config(retries={"total_max_attempts": 1})

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
#: The developer guide's templates and hook configuration, verbatim (see its README).
FLEET_TEMPLATE = FIXTURES / "fleet-provisioning-template.json"
HOOK_TEMPLATE = FIXTURES / "pre-provisioning-hook-template.json"
HOOK_CONFIG = FIXTURES / "pre-provisioning-hook.json"
#: The guide's Lambda ARN, mapped to the guide's Python handler in tests/hooks_fixtures.py.
GUIDE_HOOK_ARN: str = json.loads(HOOK_CONFIG.read_text())["targetArn"]
GUIDE_HOOKS = {GUIDE_HOOK_ARN: "python:tests.hooks_fixtures:pre_provisioning_hook"}

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]})


def policy_document(*actions: str, resource: str = "*") -> str:
    """A one-statement Allow policy (distinct documents for version tests)."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": list(actions), "Resource": resource}]})


def claim_policy(template_name: str) -> str:
    """The claim certificate's restricted policy as the developer guide documents it
    (spec fleet §2.3): connect, and the certificate and RegisterThing topics only."""
    topic = f"{ARN_PREFIX}topic/$aws/"
    topicfilter = f"{ARN_PREFIX}topicfilter/$aws/"
    register = f"provisioning-templates/{template_name}/provision/*"
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": [f"{topic}certificates/create/*", f"{topic}{register}"]},
        {"Effect": "Allow", "Action": ["iot:Subscribe"],
         "Resource": [f"{topicfilter}certificates/create/*", f"{topicfilter}{register}"]},
    ]})


def unique(prefix: str = "t") -> str:
    """A fresh name valid for every IoT resource kind (``[0-9A-Za-z_-]``, at most 36
    characters for a prefix of up to 23)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- the emulator


@dataclass(frozen=True)
class Live:
    """A running emulator and a boto3 ``iot`` client pointed at its ``api_url``."""

    embedded: EmbeddedEmulator
    iot: Any

    @property
    def api_url(self) -> str:
        return self.embedded.info.api_url

    def client(self, **config: Any) -> Any:
        """Another boto3 ``iot`` client on the same endpoint (``Config(**config)`` merged
        over :data:`NO_RETRIES`), e.g. ``parameter_validation=False``."""
        return make_client(self.api_url, NO_RETRIES.merge(Config(**config)))

    def records(self) -> dict[str, dict[Any, Any]]:
        """Every committed registry record by table (what "changed nothing" compares)."""
        return self.embedded.emulator.registry.dump()

    def advance_clock(self, seconds: float) -> None:
        """Move the emulated clock (an emulator-only extension; AWS needs real waiting)."""
        self.embedded.emulator.clock.advance(seconds)


def make_client(api_url: str, config: Config = NO_RETRIES) -> Any:
    """boto3 exactly as a setup script makes it, plus ``endpoint_url``: any credentials."""
    return boto3.client("iot", endpoint_url=api_url, region_name=REGION,
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="any-secret",
                        config=config)


def start_live(hooks: Mapping[str, str] | None = None) -> Live:
    """An emulator on free loopback ports with the guide's hook ARN mapped."""
    config = EmulatorConfig(mqtt_port=0, api_port=0, region=REGION, account_id=ACCOUNT,
                            hooks=dict(GUIDE_HOOKS if hooks is None else hooks))
    embedded = EmbeddedEmulator(config)
    embedded.start()
    return Live(embedded, make_client(embedded.info.api_url))


def emulator_fixture() -> Any:
    """The module-scoped ``live`` fixture; in a test module: ``live = emulator_fixture()``."""

    @pytest.fixture(scope="module", name="live")
    def _live() -> Iterator[Live]:
        live = start_live()
        try:
            yield live
        finally:
            live.embedded.stop()

    return _live


# --------------------------------------------------------------------------- output shapes


def output_shape(iot: Any, operation: str) -> Shape:
    shape = iot.meta.service_model.operation_model(operation).output_shape
    assert shape is not None, f"{operation} has no output shape"
    return shape


def output_members(iot: Any, operation: str) -> frozenset[str]:
    """The member names botocore models for ``operation``'s output."""
    return frozenset(output_shape(iot, operation).members)


_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "long": (int,),
    "float": (int, float),
    "double": (int, float),
    "blob": (bytes,),
}


def _problems(shape: Shape, value: Any, path: str) -> Iterator[str]:
    """Where ``value`` (as boto3 parsed it) departs from ``shape``."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            yield f"{path or '<output>'}: {type(value).__name__}, not a structure"
            return
        members = shape.members  # type: ignore[attr-defined]
        for key, item in value.items():
            if not path and key == "ResponseMetadata":
                continue
            if key not in members:
                yield f"{path}{key}: not a member of {shape.name}"
            else:
                yield from _problems(members[key], item, f"{path}{key}.")
    elif kind == "list":
        if not isinstance(value, list):
            yield f"{path[:-1]}: {type(value).__name__}, not a list"
            return
        for n, item in enumerate(value):
            yield from _problems(shape.member, item, f"{path}[{n}].")  # type: ignore[attr-defined]
    elif kind == "map":
        if not isinstance(value, dict):
            yield f"{path[:-1]}: {type(value).__name__}, not a map"
            return
        for key, item in value.items():
            yield from _problems(shape.value, item, f"{path}{key}.")  # type: ignore[attr-defined]
    elif kind == "timestamp":
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            yield f"{path[:-1]}: {value!r} is not an aware datetime"
    elif kind in _PYTHON_TYPES:
        wrong_bool = isinstance(value, bool) and kind in ("integer", "long", "float", "double")
        if wrong_bool or not isinstance(value, _PYTHON_TYPES[kind]):
            # Sensitive members (private keys) are named, never shown.
            shown = "<sensitive>" if shape.metadata.get("sensitive") else repr(value)
            yield f"{path[:-1]}: {shown} is not a {kind}"


def check_output(iot: Any, operation: str, response: Mapping[str, Any]) -> set[str]:
    """Assert every member of ``response`` is modeled for ``operation`` with its modeled
    type (timestamps: aware datetimes); return the top-level member names present."""
    problems = list(_problems(output_shape(iot, operation), dict(response), ""))
    assert not problems, f"{operation} output departs from botocore's model: {problems}"
    return set(response) - {"ResponseMetadata"}


def assert_members(iot: Any, operation: str, response: Mapping[str, Any],
                   absent: tuple[str, ...] = ()) -> None:
    """:func:`check_output`, and the members present are exactly the modeled ones minus
    ``absent`` (those AWS omits in this situation: a last page's token, unset options)."""
    present = check_output(iot, operation, response)
    expected = set(output_members(iot, operation)) - set(absent)
    assert present == expected, (
        f"{operation}: missing {sorted(expected - present)}, unexpected "
        f"{sorted(present - expected)}")


def assert_item_members(iot: Any, operation: str, items: list[Mapping[str, Any]],
                        member: str, absent: tuple[str, ...] = ()) -> None:
    """Each element of list member ``member`` carries exactly its modeled members minus
    ``absent``."""
    item_shape = output_shape(iot, operation).members[member].member  # type: ignore[attr-defined]
    expected = set(item_shape.members) - set(absent)
    for item in items:
        assert set(item) == expected, (
            f"{operation}.{member}[]: missing {sorted(expected - set(item))}, "
            f"unexpected {sorted(set(item) - expected)}")


def walk(iot: Any, operation: str, page_size: int | None = None, **members: Any) -> list[Any]:
    """Every item of a paginated list operation (boto3 name), through boto3's own
    paginator: the first result key of every page, in order."""
    paginator = iot.get_paginator(operation)
    key = paginator.result_keys[0].expression
    config = {"PageSize": page_size} if page_size else {}
    return [item for page in paginator.paginate(**members, PaginationConfig=config)
            for item in page[key]]


def paged_alike(iot: Any, operation: str, **members: Any) -> list[Any]:
    """The items of ``operation``, asserting that one-item pages (tokens or markers
    followed to the end) give exactly what one unpaged walk gives (spec broker §5.1)."""
    whole = walk(iot, operation, **members)
    assert walk(iot, operation, page_size=1, **members) == whole, f"{operation} pages differ"
    return whole


# --------------------------------------------------------------------------- "changes nothing"


def _strip(response: Any) -> Any:
    if isinstance(response, dict):
        return {k: v for k, v in response.items() if k != "ResponseMetadata"}
    return response


def _read(reader: Callable[[], Any]) -> Any:
    try:
        return ("ok", _strip(reader()))
    except Exception as exc:  # a read that fails must keep failing the same way
        return ("error", type(exc).__name__)


@contextmanager
def unchanged(live: Live, *reads: Callable[[], Any]) -> Iterator[None]:
    """Assert that the block changed no committed registry record and that each boto3
    read answers the same after it as before (design principle 6)."""
    before_records = live.records()
    before_reads = [_read(r) for r in reads]
    yield
    after_reads = [_read(r) for r in reads]
    assert after_reads == before_reads, "a failed call changed what boto3 reads back"
    assert live.records() == before_records, "a failed call changed the registry"


def modeled_status(iot: Any, code: str) -> int:
    """The HTTP status botocore's model gives error shape ``code`` (spec broker §5.2)."""
    shape = iot.meta.service_model.shape_for(code)
    return int(shape.metadata["error"]["httpStatusCode"])


@contextmanager
def aws_error(iot: Any, code: str, message: str | None = None, *,
              match: str | None = None) -> Iterator[pytest.ExceptionInfo[Any]]:
    """Expect ``client.exceptions.<code>`` with the modeled HTTP status, and AWS's
    ``message`` exactly (or one matching the regex ``match``)."""
    with pytest.raises(getattr(iot.exceptions, code)) as info:
        yield info
    response = info.value.response
    assert response["Error"]["Code"] == code
    assert response["ResponseMetadata"]["HTTPStatusCode"] == modeled_status(iot, code)
    text = response["Error"]["Message"]
    if message is not None:
        assert text == message
    if match is not None:
        assert re.search(match, text), f"{text!r} does not match {match!r}"


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class OwnCa:
    """A CA of a test's own, with its verification certificate for RegisterCACertificate."""

    authority: pki.CertificateAuthority
    verification_pem: str

    @property
    def pem(self) -> str:
        return self.authority.pem

    def device_pem(self) -> str:
        """A new device certificate signed by this CA (EC P-256, key discarded)."""
        key = pki.generate_ec_key()
        return pki.certificate_pem(self.authority.issue_device_certificate(key.public_key()))


def make_ca(registration_code: str) -> OwnCa:
    """A fresh CA (unique subject) and a verification certificate whose CN is the
    account's registration code (spec broker §2.4)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    authority = pki.CertificateAuthority.create(common_name=unique("test-ca"))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_code)])
    verification = authority.issue_device_certificate(pki.generate_ec_key().public_key(),
                                                      subject)
    return OwnCa(authority, pki.certificate_pem(verification))


def public_der(public_key: Any) -> bytes:
    """A public key's SubjectPublicKeyInfo DER (to compare keys of any type)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def key_matches_certificate(private_key_pem: str, certificate_pem: str) -> bool:
    """Whether the certificate certifies the private key's public half (a bool, so that a
    failed assert never prints the key)."""
    key = pki.load_private_key(private_key_pem)
    cert = pki.load_certificate(certificate_pem)
    return public_der(key.public_key()) == public_der(cert.public_key())


def csr_pem(common_name: str = "fleetbench device") -> str:
    """A CSR for a fresh EC P-256 key (the key is not kept)."""
    return pki.make_csr(pki.generate_ec_key(), common_name)
