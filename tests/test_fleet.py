"""The provisioning setup (harness.fleet) and teardown (harness.teardown), through boto3 only.

Against the emulator (in-process, real HTTP control plane) for everything it serves, and
against moto for IAM role creation and as a second, independent enforcer of AWS's
deletion order (moto refuses deleting an ACTIVE or attached certificate too).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from harness import pki
from harness.endpoints.local import LocalEndpoint
from harness.fleet import ClaimPolicyVariant, Fleet, FleetSpec, demo_template_body
from harness.teardown import CleanupReport, ResourceKind, cleanup_prefix, owned

REGION = "us-east-1"


@pytest.fixture(scope="module")
def emulator() -> Iterator[LocalEndpoint]:
    endpoint = LocalEndpoint.start(mode="in-process")
    yield endpoint
    endpoint.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A prefix of its own per test, so tests sharing the emulator never see each other."""
    return f"fbt-{abs(hash(request.node.nodeid)) % 10**8:08d}"


def make_fleet(endpoint: LocalEndpoint, tmp_path: Path, **spec: Any) -> Fleet:
    return Fleet.for_endpoint(endpoint, FleetSpec(workdir=tmp_path / "fleet", **spec))


def names(page: dict[str, Any], key: str, field: str) -> set[str]:
    return {item[field] for item in page[key]}


def provision_by_hand(iot: Any, thing_name: str, policy_name: str) -> str:
    """What RegisterThing leaves behind, made through the control plane: a thing, an ACTIVE
    certificate attached to it, and an inline (hash-named) policy on the certificate."""
    iot.create_thing(thingName=thing_name)
    cert = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_thing_principal(thingName=thing_name, principal=cert["certificateArn"])
    if policy_name not in {p["policyName"] for p in iot.list_policies()["policies"]}:
        iot.create_policy(policyName=policy_name, policyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Publish", "Resource": "*"}]}))
    iot.attach_policy(policyName=policy_name, target=cert["certificateArn"])
    return str(cert["certificateId"])


# --------------------------------------------------------------------------- setup


def test_setup_creates_template_groups_and_claim_policy_named_with_the_run_prefix(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    fleet = make_fleet(emulator, tmp_path, prefix=prefix, thing_groups=("line-a",),
                       thing_types=("sensor",), billing_groups=("pilot",))
    iot = emulator.iot
    with fleet:
        # spec fleet §6.1: the template as CreateProvisioningTemplate stored it
        template = iot.describe_provisioning_template(templateName=fleet.template_name)
        assert fleet.template_name == f"{prefix}-template"
        assert template["enabled"] is True
        assert template["provisioningRoleArn"] == fleet.role_arn
        body = json.loads(template["templateBody"])
        thing = body["Resources"]["thing"]["Properties"]
        assert thing["ThingGroups"] == [f"{prefix}-line-a"]
        assert thing["ThingTypeName"] == f"{prefix}-sensor"
        assert thing["BillingGroup"] == f"{prefix}-pilot"
        assert iot.describe_thing_group(thingGroupName=f"{prefix}-line-a")
        assert iot.describe_thing_type(thingTypeName=f"{prefix}-sensor")
        assert iot.describe_billing_group(billingGroupName=f"{prefix}-pilot")
        assert iot.get_policy(policyName=f"{prefix}-claim")


def test_setup_passes_the_pre_provisioning_hook_to_the_template(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    hook = f"arn:aws:lambda:{REGION}:123456789012:function:{prefix}-hook"
    with make_fleet(emulator, tmp_path, prefix=prefix, hook_arn=hook, enabled=False) as fleet:
        # spec fleet §3.6, §6.1: preProvisioningHook {targetArn, payloadVersion}; enabled flag
        template = emulator.iot.describe_provisioning_template(templateName=fleet.template_name)
        assert template["preProvisioningHook"] == {"targetArn": hook,
                                                   "payloadVersion": "2020-04-01"}
        assert template["enabled"] is False


@pytest.mark.parametrize(("variant", "allowed", "refused"), [
    (ClaimPolicyVariant.KEYS, "$aws/certificates/create/*", "$aws/certificates/create-from-csr/*"),
    (ClaimPolicyVariant.CSR, "$aws/certificates/create-from-csr/*", "$aws/certificates/create/*"),
])
def test_claim_policy_allows_only_the_chosen_certificate_api(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str, variant: ClaimPolicyVariant,
        allowed: str, refused: str) -> None:
    with make_fleet(emulator, tmp_path, prefix=prefix, claim_policy=variant) as fleet:
        # spec fleet §2.3 (and edge case 12: create/* does not cover create-from-csr)
        document = emulator.iot.get_policy(policyName=fleet.claim_policy_name)["policyDocument"]
        resources = [r for s in json.loads(document)["Statement"]
                     for r in ([s["Resource"]] if isinstance(s["Resource"], str)
                               else s["Resource"])]
        assert any(r.endswith(allowed) for r in resources)
        assert not any(r.endswith(refused) for r in resources)
        assert any(r.endswith(f"provisioning-templates/{fleet.template_name}/provision/*")
                   for r in resources)


def test_create_claim_writes_the_key_0600_and_attaches_the_claim_policy(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    iot = emulator.iot
    with make_fleet(emulator, tmp_path, prefix=prefix) as fleet:
        claim = fleet.create_claim()
        # spec broker §2.1: the id is the SHA-256 of the certificate's DER
        assert claim.certificate_id == pki.certificate_id(claim.cert_path.read_text())
        assert stat.S_IMODE(os.stat(claim.key_path).st_mode) == 0o600
        assert not claim.temporary
        description = iot.describe_certificate(certificateId=claim.certificate_id)
        assert description["certificateDescription"]["status"] == "ACTIVE"
        arn = description["certificateDescription"]["certificateArn"]
        attached = iot.list_attached_policies(target=arn)["policies"]
        assert [p["policyName"] for p in attached] == [fleet.claim_policy_name]
    # teardown removed the claim certificate (found through the claim policy)
    with pytest.raises(ClientError) as err:
        iot.describe_certificate(certificateId=claim.certificate_id)
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_failed_setup_removes_what_it_had_made(emulator: LocalEndpoint, tmp_path: Path,
                                               prefix: str) -> None:
    fleet = make_fleet(emulator, tmp_path, prefix=prefix, thing_groups=("g",),
                       template_body="{ not a template")
    # spec fleet §3.7: a malformed body is refused at creation
    with pytest.raises(ClientError):
        fleet.setup()
    groups = emulator.iot.list_thing_groups(namePrefixFilter=prefix)["thingGroups"]
    assert groups == []


def test_default_template_names_things_with_the_prefix_and_serial() -> None:
    from harness.emulator.templates import evaluate, validate_template_body

    body = json.dumps(demo_template_body("fb-x", region=REGION, account_id="123456789012"))
    validate_template_body(body)  # spec fleet §3.7: accepted at creation
    plan = evaluate(body, {"SerialNumber": "SN7"},
                    {"AWS::IoT::Certificate::Id": "ab" * 32})  # spec fleet §3.4
    assert plan.thing is not None and plan.thing.thing_name == "fb-x-SN7"
    document = json.loads(plan.policies[0].policy_document or "{}")
    resources = [r for s in document["Statement"] for r in s["Resource"]]
    assert f"arn:aws:iot:{REGION}:123456789012:client/fb-x-SN7" in resources
    assert f"arn:aws:iot:{REGION}:123456789012:topic/device/fb-x-SN7/*" in resources
    assert any("dt/${iot:Connection.Thing.ThingName}/*" in r for r in resources)


def test_spec_refuses_a_prefix_too_long_for_a_template_name() -> None:
    # spec fleet §5: template names are 1-36 characters
    with pytest.raises(ValueError, match="1-36"):
        FleetSpec(prefix="p" * 40)


# --------------------------------------------------------------------------- teardown


def test_teardown_removes_devices_things_certificates_and_inline_policies(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    iot = emulator.iot
    fleet = make_fleet(emulator, tmp_path, prefix=prefix, thing_groups=("g",)).setup()
    inline = f"{abs(hash(prefix)):040X}"[:40]  # RegisterThing names inline policies by hash
    certs = [provision_by_hand(iot, fleet.thing_name(f"SN{i}"), inline) for i in range(2)]
    claim = fleet.create_claim()

    report = fleet.teardown()

    # spec broker §5.4: detach, deactivate, delete, in that order — or AWS refuses
    assert report.ok, report.summary()
    assert set(report.removed_names(ResourceKind.THING)) == {f"{prefix}-SN0", f"{prefix}-SN1"}
    assert set(report.removed_names(ResourceKind.CERTIFICATE)) == {*certs, claim.certificate_id}
    assert set(report.removed_names(ResourceKind.POLICY)) == {inline, f"{prefix}-claim"}
    assert report.removed_names(ResourceKind.PROVISIONING_TEMPLATE) == [fleet.template_name]
    assert report.removed_names(ResourceKind.THING_GROUP) == [f"{prefix}-g"]
    assert not [t for t in iot.list_things()["things"] if owned(t["thingName"], prefix)]
    assert not claim.key_path.exists()


def test_teardown_reports_a_leftover_instead_of_touching_a_foreign_thing(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    iot = emulator.iot
    fleet = make_fleet(emulator, tmp_path, prefix=prefix).setup()
    claim = fleet.create_claim()
    foreign = f"other-{prefix}"
    iot.create_thing(thingName=foreign)
    arn = iot.describe_certificate(
        certificateId=claim.certificate_id)["certificateDescription"]["certificateArn"]
    iot.attach_thing_principal(thingName=foreign, principal=arn)
    try:
        report = fleet.teardown()
        assert not report.ok
        leftovers = {(lo.resource.kind, lo.resource.name): lo.reason for lo in report.leftovers}
        assert foreign in leftovers[(ResourceKind.CERTIFICATE, claim.certificate_id)]
        assert f"cleanup --prefix {prefix}" in report.summary()
        assert iot.describe_thing(thingName=foreign)["thingName"] == foreign
    finally:
        iot.detach_thing_principal(thingName=foreign, principal=arn)
        iot.delete_thing(thingName=foreign)
        assert cleanup_prefix(iot, prefix, retry_timeout=1).ok


def test_teardown_is_idempotent(emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    fleet = make_fleet(emulator, tmp_path, prefix=prefix).setup()
    first = fleet.teardown()
    second = fleet.teardown()
    assert first.ok and second.ok
    assert second.removed == ()


def test_teardown_removes_a_tracked_certificate_that_no_thing_leads_to(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    iot = emulator.iot
    fleet = make_fleet(emulator, tmp_path, prefix=prefix).setup()
    stray = iot.create_keys_and_certificate(setAsActive=False)["certificateId"]
    fleet.track_certificate(stray)
    report = fleet.teardown()
    assert stray in report.removed_names(ResourceKind.CERTIFICATE)


def test_cleanup_command_removes_a_crashed_runs_leftovers(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    iot = emulator.iot
    fleet = make_fleet(emulator, tmp_path, prefix=prefix, billing_groups=("b",)).setup()
    provision_by_hand(iot, fleet.thing_name("SN1"), f"{prefix}-device")
    fleet.create_claim()
    # the run "crashes" here: no teardown. A user runs the command.
    endpoint_file = Path(emulator.data_dir) / "endpoint.json"
    done = subprocess.run(
        [sys.executable, "-m", "harness.cleanup_cli", "cleanup", "--prefix", prefix,
         "--endpoint-file", str(endpoint_file), "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    removed = {(r["kind"], r["name"]) for r in json.loads(done.stdout)["removed"]}
    assert ("thing", f"{prefix}-SN1") in removed
    assert ("billing_group", f"{prefix}-b") in removed
    assert ("provisioning_template", fleet.template_name) in removed
    assert not iot.list_billing_groups(namePrefixFilter=prefix)["billingGroups"]


def test_cleanup_command_without_an_endpoint_is_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "harness.cleanup_cli", "cleanup", "--prefix",
                           "fb-123"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--endpoint-file" in done.stderr


def test_cleanup_refuses_a_prefix_that_could_sweep_an_account() -> None:
    with pytest.raises(ValueError, match="shorter"):
        cleanup_prefix(None, "f")


@pytest.mark.parametrize(("name", "expected"), [
    ("fb-1a2b", True), ("fb-1a2b-SN1", True), ("fb-1a2bc-SN1", False), ("xfb-1a2b", False)])
def test_a_name_belongs_to_a_run_only_by_the_prefix_and_a_dash(name: str, expected: bool) -> None:
    assert owned(name, "fb-1a2b") is expected


# --------------------------------------------------------------------------- moto


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # AWSIoTThingsRegistration
    with mock_aws():
        yield


def test_cleanup_follows_awss_deletion_order_in_moto_too(aws: None) -> None:
    iot = boto3.client("iot", region_name=REGION)
    run, other = "fb-moto1", "fb-moto2"
    mine = provision_by_hand(iot, f"{run}-SN1", "0A1B2C3D4E5F60718293A4B5C6D7E8F901234567")
    theirs = provision_by_hand(iot, f"{other}-SN1", f"{other}-device")
    iot.create_thing_group(thingGroupName=f"{run}-g")
    iot.create_billing_group(billingGroupName=f"{run}-b")
    iot.create_thing_type(thingTypeName=f"{run}-t")

    report = cleanup_prefix(iot, run, retry_timeout=1)

    assert {t["thingName"] for t in iot.list_things()["things"]} == {f"{other}-SN1"}
    assert {c["certificateId"] for c in iot.list_certificates()["certificates"]} == {theirs}
    assert names(iot.list_policies(), "policies", "policyName") == {f"{other}-device"}
    assert iot.list_thing_groups()["thingGroups"] == []
    assert iot.list_billing_groups()["billingGroups"] == []
    assert mine in report.removed_names(ResourceKind.CERTIFICATE)
    assert f"{run}-t" in report.removed_names(ResourceKind.THING_TYPE)
    # moto lacks ListProvisioningTemplates: that gap is reported, not hidden
    assert [lo.resource.kind for lo in report.leftovers] == [ResourceKind.PROVISIONING_TEMPLATE]


def test_fleet_creates_the_provisioning_role_with_iam_and_removes_it(
        aws: None, emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    iam = boto3.client("iam", region_name=REGION)  # moto; iot stays the emulator
    fleet = Fleet(emulator.iot, FleetSpec(prefix=prefix, create_role=True,
                                          workdir=tmp_path / "fleet"),
                  region=REGION, account_id=emulator.account_id, iam=iam)
    fleet.setup()
    role_name = f"{prefix}-provisioning"
    # spec fleet §2.3: trusts iot.amazonaws.com, carries AWSIoTThingsRegistration
    role = iam.get_role(RoleName=role_name)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    if isinstance(trust, str):
        trust = json.loads(trust)
    assert trust["Statement"][0]["Principal"] == {"Service": "iot.amazonaws.com"}
    attached = iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]
    assert [p["PolicyName"] for p in attached] == ["AWSIoTThingsRegistration"]
    template = emulator.iot.describe_provisioning_template(templateName=fleet.template_name)
    assert template["provisioningRoleArn"] == role["Arn"]

    report: CleanupReport = fleet.teardown()

    assert report.ok, report.summary()
    assert report.removed_names(ResourceKind.ROLE) == [role_name]
    with pytest.raises(ClientError):
        iam.get_role(RoleName=role_name)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("flow", ["claim", "trusted-user"])
def test_a_virtual_device_provisions_from_the_fleet_and_teardown_removes_what_it_got(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str, flow: str) -> None:
    from devices.base import DeviceInputs, EndpointParams, Flow, create_device

    iot = emulator.iot
    fleet = make_fleet(emulator, tmp_path, prefix=prefix).setup()
    claim = fleet.create_claim() if flow == "claim" else fleet.create_trusted_user_claim()
    assert claim.temporary is (flow == "trusted-user")  # spec fleet §2.1, §2.2
    mark = emulator.observer.mark()
    inputs = DeviceInputs(
        endpoint=EndpointParams(emulator.mqtt_host, emulator.mqtt_port, emulator.ca_file,
                                emulator.mqtt_server_name),
        claim=claim, template_name=fleet.template_name, flow=Flow(flow),
        parameters={"SerialNumber": "SN1"}, serial="SN1", client_id=f"{prefix}-boot",
        workdir=tmp_path / "device")

    result = create_device("virtual").provision(inputs)

    assert result.ok, result.to_json()
    assert result.thing_name == fleet.thing_name("SN1")
    # the verdict comes from the endpoint (design principle 2)
    trace = emulator.observer.trace(client_id=f"{prefix}-boot", since=mark)
    trace.assert_provisioned()
    assert trace.claim_certificate_id == claim.certificate_id
    assert (trace.certificate_id, trace.thing_name) == (result.certificate_id, result.thing_name)
    arn = iot.describe_certificate(
        certificateId=result.certificate_id)["certificateDescription"]["certificateArn"]
    inline = [p["policyName"] for p in iot.list_attached_policies(target=arn)["policies"]]
    assert len(inline) == 1 and not owned(inline[0], prefix)  # named by RegisterThing

    report = fleet.teardown()

    assert report.ok, report.summary()
    assert result.thing_name in report.removed_names(ResourceKind.THING)
    assert result.certificate_id in report.removed_names(ResourceKind.CERTIFICATE)
    assert inline[0] in report.removed_names(ResourceKind.POLICY)


def documented_iam_actions() -> set[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "real-aws.md").read_text()
    policy = json.loads(text.split("```json", 1)[1].split("```", 1)[0])
    return {action for statement in policy["Statement"]
            for action in ([statement["Action"]] if isinstance(statement["Action"], str)
                           else statement["Action"])}


def test_the_documented_iam_policy_allows_every_iot_call_the_harness_makes(
        emulator: LocalEndpoint, tmp_path: Path, prefix: str) -> None:
    from devices.base import DeviceInputs, EndpointParams, create_device
    from harness.endpoints.aws import AwsEndpoint

    session = boto3.Session(aws_access_key_id="fleetbench", aws_secret_access_key="x",
                            region_name=emulator.region)
    endpoint = AwsEndpoint(session, prefix=prefix, iot_endpoint_url=emulator.api_url,
                           ca_file=emulator.ca_file, mqtt_port=emulator.mqtt_port,
                           account_id=emulator.account_id)
    called = {"DescribeEndpoint"}
    endpoint.iot.meta.events.register(
        "before-call.iot", lambda model, **_: called.add(model.name))
    try:
        fleet = Fleet.for_endpoint(endpoint, FleetSpec(
            prefix=prefix, thing_groups=("g",), thing_types=("t",), billing_groups=("b",),
            workdir=tmp_path / "fleet")).setup()
        mark = endpoint.observer.mark()
        claim = fleet.create_claim()
        fleet.create_trusted_user_claim()
        params = EndpointParams(endpoint.mqtt_host, endpoint.mqtt_port, endpoint.ca_file,
                                endpoint.mqtt_server_name)
        result = create_device("virtual").provision(DeviceInputs(
            endpoint=params, claim=claim, template_name=fleet.template_name,
            parameters={"SerialNumber": "SN1"}, serial="SN1", client_id=f"{prefix}-boot",
            workdir=tmp_path / "device"))
        assert result.ok, result.to_json()
        assert endpoint.observer.trace(client_id=f"{prefix}-boot", since=mark).provisioned
        report = fleet.teardown()
        # spec broker §5.4: a thing type can be deleted only 5 minutes after deprecation
        assert [lo.resource.kind for lo in report.leftovers] == [ResourceKind.THING_TYPE]
        emulator.clock.advance(301)
        assert cleanup_prefix(endpoint.iot, prefix).ok
    finally:
        endpoint.close()
    needed = {f"iot:{name}" for name in called}
    assert needed - documented_iam_actions() == set()
