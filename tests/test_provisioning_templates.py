"""What RegisterThing does with a template, end to end: the guide's examples, hooks and their
overrides, OverrideSettings on an existing thing, shared inline policies, certificate status,
durability, observations, and a fleet of devices provisioning at once (spec fleet §1.4, §3, §4)."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from harness import pki, protocol
from harness.clock import Clock
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.registry import CertificateStatus, Registry
from harness.emulator.templates import PolicyPlan
from harness.errors import ResourceAlreadyExistsException
from harness.observations import Kind
from harness.protocol import Api, ErrorResponse
from tests.test_provisioning_kit import (
    ACCOUNT,
    DEVICE_POLICY,
    FIXTURES,
    HOOK_ARN,
    REGION,
    PahoDevice,
    Refused,
    create_certificate,
    create_template,
    emulator,
    factory_claim,
    fleet_template,
    register,
    registry_of,
    trusted_user_claim,
    unique,
    write_identity,
)

__all__ = ["emulator"]


def ensure(create: Callable[..., Any], **members: Any) -> None:
    """Create a resource unless it already exists (fixed names from the guide's examples)."""
    try:
        create(**members)
    except ResourceAlreadyExistsException:
        pass


def groups_of(emu: EmbeddedEmulator, thing_name: str) -> set[str]:
    page = registry_of(emu).list_thing_groups_for_thing(thing_name=thing_name)
    return {g.group_name for g in page.thing_groups}


@pytest.fixture()
def device(emulator: EmbeddedEmulator, tmp_path: Path) -> Any:
    connected = PahoDevice(emulator, factory_claim(emulator, tmp_path, "*"), unique("claim"))
    yield connected
    connected.close()


def test_the_guides_fleet_template_provisions_as_documented(emulator: EmbeddedEmulator,
                                                            device: PahoDevice) -> None:
    # spec fleet §3 (S3 "Template example for fleet provisioning"), edge cases 4, 9, 16
    reg = registry_of(emulator)
    serial = unique("sn")
    reg.create_thing_type(thing_type_name=f"ThingPrefix_{serial}")
    for group in ("v1-lightbulbs", "WA"):
        ensure(reg.create_thing_group, thing_group_name=group)
    ensure(reg.create_billing_group, billing_group_name="LightBulbBillingGroup")
    template = create_template(emulator, (FIXTURES / "fleet-provisioning-template.json")
                               .read_text())
    new = create_certificate(device, "keys", "json")
    thing_name = unique("lightbulb")
    answer = register(device, template, "json", new.token, {
        "ThingName": thing_name, "SerialNumber": serial, "DeviceLocation": "Seattle",
        "Undeclared": "ignored"})
    assert not isinstance(answer, ErrorResponse), answer
    assert answer.thing_name == thing_name
    assert dict(answer.device_configuration) == {
        "FallbackUrl": "https://www.example.com/test-site", "LocationUrl": "https://example.aws"}
    thing = reg.describe_thing(thing_name=thing_name)
    assert thing.thing_type_name == f"ThingPrefix_{serial}"
    assert dict(thing.attributes) == {"version": "v1", "serialNumber": "serialNumber"}
    assert thing.billing_group_name == "LightBulbBillingGroup"
    assert groups_of(emulator, thing_name) == {"v1-lightbulbs", "WA"}
    cert = reg.get_certificate(new.certificate_id)
    assert cert is not None and cert.status is CertificateStatus.ACTIVE  # "Active" accepted
    assert reg.list_principal_things(principal=cert.certificate_arn).things == [thing_name]
    (policy,) = reg.list_attached_policies(target=cert.certificate_arn).policies
    assert len(policy.policy_name) == 40 and policy.policy_name.isupper()


def test_the_guides_hook_example_overrides_the_device_location(emulator: EmbeddedEmulator,
                                                               device: PahoDevice) -> None:
    # spec fleet §4: the guide's hook answers DeviceLocation=Seattle; the override wins over
    # the device's value; the template refers to SerialNumber without declaring it (§3.7)
    reg = registry_of(emulator)
    serial = unique("sn")
    reg.create_thing_type(thing_type_name=f"ThingTypePrefix_{serial}")
    for group in ("widgets", "WA"):
        ensure(reg.create_thing_group, thing_group_name=group)
    ensure(reg.create_billing_group, billing_group_name="BillingGroup")
    hook = json.loads((FIXTURES / "pre-provisioning-hook.json").read_text())
    emulator.emulator.hook_targets.set(hook["targetArn"],
                                       "python:tests.hooks_fixtures:pre_provisioning_hook")
    template = create_template(emulator, (FIXTURES / "pre-provisioning-hook-template.json")
                               .read_text(), hook_arn=hook["targetArn"])
    new = create_certificate(device, "csr", "cbor")
    answer = register(device, template, "cbor", new.token,
                      {"SerialNumber": serial, "DeviceLocation": "Portland"})
    assert not isinstance(answer, ErrorResponse), answer
    assert answer.thing_name == f"ThingPrefix_{serial}"
    assert answer.device_configuration["LocationUrl"] == "https://example.aws"
    (seen,) = emulator.emulator.observations.query(kinds=[Kind.HOOK.value],
                                                   certificate_id=new.certificate_id)
    assert seen.detail["allowed"] is True and seen.detail["reason"] == "allowed"


def test_the_hook_receives_what_aws_sends(emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §4 input event; edge case 8: certificateId is the new certificate,
    # claimCertificateId the connection's (here a trusted-user claim, §2.2)
    arn = f"{HOOK_ARN}-{unique('echo')}"
    emulator.emulator.hook_targets.set(arn, "python:tests.hooks_fixtures:echo")
    body = fleet_template()
    body["DeviceConfiguration"]["event"] = {"Ref": "event"}  # the hook's override, echoed back
    template = create_template(emulator, body, hook_arn=arn)
    claim = trusted_user_claim(emulator, tmp_path, template)
    client_id = unique("installer")
    device = PahoDevice(emulator, claim, client_id)
    try:
        new = create_certificate(device, "csr", "json")
        serial = unique("sn")
        answer = register(device, template, "json", new.token, {"SerialNumber": serial})
    finally:
        device.close()
    assert not isinstance(answer, ErrorResponse), answer
    event = json.loads(answer.device_configuration["event"])
    assert event == {
        "claimCertificateId": claim.certificate_id,
        "certificateId": new.certificate_id,
        "certificatePem": new.certificate_pem,
        "templateArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:provisioningtemplate/{template}",
        "clientId": client_id,
        "parameters": {"SerialNumber": serial},
    }


@pytest.mark.parametrize("overrides, attributes, groups", [
    ({"AttributePayload": "MERGE", "ThingGroups": "REPLACE"},
     lambda serial: {"color": "red", "serial": serial}, {"new"}),
    ({"AttributePayload": "REPLACE", "ThingGroups": "MERGE"},
     lambda serial: {"serial": serial}, {"old", "new"}),
    ({"AttributePayload": "DO_NOTHING", "ThingGroups": "DO_NOTHING"},
     lambda serial: {"color": "red"}, {"old"}),
    ({}, lambda serial: {"serial": serial}, {"new"}),  # absent keys: REPLACE (UNCONFIRMED)
], ids=["merge-replace", "replace-merge", "do-nothing", "absent"])
def test_an_existing_thing_is_updated_per_override_settings(
        emulator: EmbeddedEmulator, device: PahoDevice, overrides: dict[str, str],
        attributes: Callable[[str], dict[str, str]], groups: set[str]) -> None:
    # spec fleet §3.3: DO_NOTHING / REPLACE / MERGE for AttributePayload and ThingGroups;
    # the earlier certificate stays attached (UNCONFIRMED, §3.3)
    reg = registry_of(emulator)
    old, new_group = unique("old"), unique("new")
    reg.create_thing_group(thing_group_name=old)
    reg.create_thing_group(thing_group_name=new_group)
    serial = unique("sn")
    thing_name = f"dev-{serial}"
    reg.create_thing(thing_name=thing_name, attribute_payload={"attributes": {"color": "red"}})
    reg.add_thing_to_thing_group(thing_group_name=old, thing_name=thing_name)
    first = create_certificate(device, "csr", "json")
    body = fleet_template(thing_groups=[new_group],
                          overrides=overrides or None)
    template = create_template(emulator, body)
    reg.attach_thing_principal(thing_name=thing_name, principal=reg.get_certificate(
        first.certificate_id).certificate_arn)  # type: ignore[union-attr]
    new = create_certificate(device, "csr", "json")
    answer = register(device, template, "json", new.token, {"SerialNumber": serial})
    assert not isinstance(answer, ErrorResponse), answer
    assert dict(reg.describe_thing(thing_name=thing_name).attributes) == attributes(serial)
    names = {"old": old, "new": new_group}
    assert groups_of(emulator, thing_name) == {names[g] for g in groups}
    principals = reg.list_thing_principals(thing_name=thing_name).principals
    assert {p.rsplit("/", 1)[1] for p in principals} == {first.certificate_id,
                                                           new.certificate_id}


def test_devices_share_one_inline_policy(emulator: EmbeddedEmulator,
                                         device: PahoDevice) -> None:
    # spec fleet §3.2, edge case 14: identical resolved documents map to one policy
    template = create_template(emulator, fleet_template())
    certificates = []
    for _ in range(2):
        new = create_certificate(device, "csr", "json")
        answer = register(device, template, "json", new.token, {"SerialNumber": unique("sn")})
        assert not isinstance(answer, ErrorResponse), answer
        certificates.append(new.certificate_id)
    document = json.dumps(DEVICE_POLICY, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
    name = PolicyPlan("policy", None, document).resolved_name()
    reg = registry_of(emulator)
    targets = set(reg.list_targets_for_policy(policy_name=name).targets)
    assert {reg.arn("cert", c) for c in certificates} <= targets


def test_an_inactive_status_keeps_the_device_out(emulator: EmbeddedEmulator,
                                                 device: PahoDevice, tmp_path: Path) -> None:
    # spec fleet §1.4: the certificate takes the template's Status (INACTIVE cannot connect)
    template = create_template(emulator, fleet_template(status="INACTIVE"))
    new = create_certificate(device, "keys", "cbor")
    answer = register(device, template, "cbor", new.token, {"SerialNumber": unique("sn")})
    assert not isinstance(answer, ErrorResponse), answer
    cert = registry_of(emulator).get_certificate(new.certificate_id)
    assert cert is not None and cert.status is CertificateStatus.INACTIVE
    identity = write_identity(tmp_path, new.certificate_pem, new.private_key_pem,
                              emulator.info.ca_file)
    with pytest.raises(Refused):
        PahoDevice(emulator, identity, answer.thing_name)


def test_a_template_without_a_thing_answers_without_a_thing_name(
        emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # spec fleet §1.4 UNCONFIRMED: no thing resource → thingName omitted; edge case 10
    body = fleet_template()
    body["Resources"].pop("thing")
    body.pop("DeviceConfiguration")
    template = create_template(emulator, body)
    new = create_certificate(device, "csr", "json")
    answer = register(device, template, "json", new.token, {"SerialNumber": "1"})
    assert not isinstance(answer, ErrorResponse), answer
    assert answer.thing_name is None and dict(answer.device_configuration) == {}
    cert = registry_of(emulator).get_certificate(new.certificate_id)
    assert cert is not None and cert.status is CertificateStatus.ACTIVE


def test_the_registration_is_on_disk_before_the_device_hears_of_it(
        emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # design principle 5: committed before accepted is published
    template = create_template(emulator, fleet_template())
    new = create_certificate(device, "csr", "json")
    answer = register(device, template, "json", new.token, {"SerialNumber": unique("sn")})
    assert not isinstance(answer, ErrorResponse), answer
    reader = Registry(Path(emulator.info.data_dir) / "registry.sqlite3", region=REGION,
                      account_id=ACCOUNT, clock=Clock(), ca=emulator.emulator.ca)
    try:
        assert reader.describe_thing(thing_name=answer.thing_name).thing_name
        cert = reader.get_certificate(new.certificate_id)
        assert cert is not None and cert.status is CertificateStatus.ACTIVE
    finally:
        reader.close()


def test_observations_tell_the_story_without_secrets(emulator: EmbeddedEmulator,
                                                     device: PahoDevice) -> None:
    # task: API_RESPONSE / CERTIFICATE_CREATED / THING_REGISTERED; never a key or a token
    template = create_template(emulator, fleet_template())
    since = emulator.emulator.observations.last_seq
    new = create_certificate(device, "keys", "json")
    answer = register(device, template, "json", new.token, {"SerialNumber": unique("sn")})
    assert not isinstance(answer, ErrorResponse), answer
    seen = emulator.emulator.observations.query(since=since)
    kinds = [o.kind for o in seen]
    assert Kind.CERTIFICATE_CREATED.value in kinds and Kind.THING_REGISTERED.value in kinds
    responses = [o.detail for o in seen if o.kind == Kind.API_RESPONSE.value
                 and o.detail.get("source") == "provisioning"]
    assert [(r["api"], r["result"]) for r in responses] == [
        ("CreateKeysAndCertificate", "accepted"), ("RegisterThing", "accepted")]
    assert all(r["latency_ms"] >= 0 and r["format"] == "json" for r in responses)
    text = json.dumps([o.to_dict() for o in seen])
    assert new.token not in text and "PRIVATE KEY" not in text


def test_twenty_devices_provisioning_at_once_each_get_only_their_own_answers(
        emulator: EmbeddedEmulator, tmp_path: Path) -> None:
    # spec fleet §1.1, edge case 1: replies only on the requesting connection
    template = create_template(emulator, fleet_template())
    claim = factory_claim(emulator, tmp_path, template)  # one claim shared by the fleet

    def provision(index: int) -> tuple[str, str, bytes, bytes, bool]:
        device = PahoDevice(emulator, claim, unique(f"fleet{index}"))
        try:
            key = pki.generate_ec_key()
            request = protocol.CreateCertificateFromCsrRequest(pki.make_csr(key))
            created = device.call(Api.CREATE_CERTIFICATE_FROM_CSR, "json",
                                  protocol.encode(request, "json"))
            serial = unique(f"fleet{index}")
            answer = register(device, template, "json", created.certificate_ownership_token,
                              {"SerialNumber": serial})
            quiet = device.messages.empty()
        finally:
            device.close()
        issued = pki.load_certificate(created.certificate_pem).public_key()
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        return (f"dev-{serial}", answer.thing_name, issued.public_bytes(*spki),
                key.public_key().public_bytes(*spki), quiet)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(provision, range(20)))
    for expected_thing, thing, issued_key, own_key, quiet in results:
        assert thing == expected_thing
        assert issued_key == own_key  # the certificate for this device's own CSR
        assert quiet  # no one else's answers arrived
    assert len({r[1] for r in results}) == 20


def test_register_thing_evaluates_the_default_version_not_the_latest(
        emulator: EmbeddedEmulator, device: PahoDevice) -> None:
    # spec fleet §1.4 step 2, §3.6, edge case 7
    template = create_template(emulator, fleet_template())
    newer = fleet_template()
    newer["DeviceConfiguration"]["version"] = "2"
    reg = registry_of(emulator)
    reg.create_provisioning_template_version(template_name=template,
                                             template_body=json.dumps(newer))
    new = create_certificate(device, "csr", "json")
    answer = register(device, template, "json", new.token, {"SerialNumber": unique("sn")})
    assert not isinstance(answer, ErrorResponse), answer
    assert "version" not in answer.device_configuration
    reg.update_provisioning_template(template_name=template, default_version_id=2)
    new = create_certificate(device, "csr", "json")
    answer = register(device, template, "json", new.token, {"SerialNumber": unique("sn")})
    assert not isinstance(answer, ErrorResponse), answer
    assert answer.device_configuration["version"] == "2"
