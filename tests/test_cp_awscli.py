"""The ``aws`` CLI against a live emulator, with only ``--endpoint-url`` added (issue 4).

One CLI call per operation family is enough here: boto3 covers every operation in
``test_cp_live_*``, and each CLI start costs about a CPU second. The centrepiece is
the AWS developer guide's walkthrough "Using pre-provisioning hooks with the AWS
CLI": the claim certificate and its restricted policy, ``create-provisioning-template
... --template-body file://template.json --pre-provisioning-hook file://hooks.json``
with the guide's files, a device provisioning by claim, and ``describe-thing``
showing the result.

Spec: fleet-provisioning.md §2.1, §2.3, §3, §4, §6.1 (the CLI example's output);
iot-broker-and-policy.md §5.1 (timestamps as epoch seconds on the wire), §5.2, §5.3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import pki
from tests.cp_live_kit import (
    ARN_PREFIX,
    HOOK_CONFIG,
    HOOK_TEMPLATE,
    REGION,
    ROLE_ARN,
    Live,
    claim_policy,
    emulator_fixture,
    output_members,
    unchanged,
    unique,
)

live = emulator_fixture()


def _cli_env() -> dict[str, str]:
    """The environment of a fresh CI box: any keys, no profile, no pager, no retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="any-secret",
               AWS_PAGER="", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_MAX_ATTEMPTS="1")
    return env


def run_aws(live: Live, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``aws iot <args> --endpoint-url <api_url> --region us-east-1 --output json``."""
    return subprocess.run(
        [sys.executable, "-m", "awscli", "iot", *args, "--endpoint-url", live.api_url,
         "--region", REGION, "--output", "json"],
        env=_cli_env(), cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def aws(live: Live, *args: str, cwd: Path | None = None) -> Any:
    """A CLI call that must succeed; its JSON output (None when it prints nothing)."""
    done = run_aws(live, *args, cwd=cwd)
    assert done.returncode == 0, f"aws iot {args[0]} failed: {done.stderr}"
    return json.loads(done.stdout) if done.stdout.strip() else None


# --------------------------------------------------------------------------- the walkthrough


def test_the_developer_guide_hook_walkthrough_end_to_end(live: Live, tmp_path: Path) -> None:
    # spec fleet §2.3 (claim certificate and its documented policy), §4 (the guide's hook:
    # allows and overrides DeviceLocation), §6.1 (create-provisioning-template output:
    # templateArn, defaultVersionId 1, templateName), §3.7 (SerialNumber undeclared),
    # §1.4 RegisterThing; the endpoint, read through the CLI, is the judge
    template_name = unique("hooked")
    serial = unique("sn")
    thing_name = f"ThingPrefix_{serial}"

    # 1. The claim certificate, written to files as the guide does.
    claim = aws(live, "create-keys-and-certificate", "--set-as-active",
                "--certificate-pem-outfile", "claim.pem.crt",
                "--private-key-outfile", "claim.private.key", cwd=tmp_path)
    assert set(claim) == output_members(live.iot, "CreateKeysAndCertificate")
    assert pki.certificate_id((tmp_path / "claim.pem.crt").read_text()) == claim["certificateId"]

    # 2. Its restricted policy (Connect; the certificate and this template's topics).
    policy_name = unique("ClaimPolicy")
    (tmp_path / "claim-policy.json").write_text(claim_policy(template_name))
    policy = aws(live, "create-policy", "--policy-name", policy_name,
                 "--policy-document", "file://claim-policy.json", cwd=tmp_path)
    assert (policy["policyName"], policy["policyVersionId"]) == (policy_name, "1")
    assert aws(live, "attach-policy", "--policy-name", policy_name,
               "--target", claim["certificateArn"]) is None

    # 3. What the guide's template refers to: a thing type, thing groups, a billing group.
    thing_type = aws(live, "create-thing-type", "--thing-type-name",
                     f"ThingTypePrefix_{serial}")
    assert set(thing_type) == output_members(live.iot, "CreateThingType")
    group = aws(live, "create-thing-group", "--thing-group-name", "widgets")
    assert group["thingGroupArn"] == f"{ARN_PREFIX}thinggroup/widgets"
    live.iot.create_thing_group(thingGroupName="WA")  # one CLI call per family is enough
    billing = aws(live, "create-billing-group", "--billing-group-name", "BillingGroup")
    assert billing["billingGroupName"] == "BillingGroup"

    # 4. The guide's command, with the guide's files under the guide's names.
    shutil.copy(HOOK_TEMPLATE, tmp_path / "template.json")
    shutil.copy(HOOK_CONFIG, tmp_path / "hooks.json")
    created = aws(live, "create-provisioning-template", "--template-name", template_name,
                  "--provisioning-role-arn", ROLE_ARN, "--template-body", "file://template.json",
                  "--enabled", "--pre-provisioning-hook", "file://hooks.json", cwd=tmp_path)
    assert created == {"templateArn": f"{ARN_PREFIX}provisioningtemplate/{template_name}",
                       "defaultVersionId": 1, "templateName": template_name}

    # 5. A device provisions by claim over MQTT.
    if live.embedded.emulator.provisioning is None:
        pytest.skip("the emulator's provisioning service is not in this build")
    result = _provision_device(live, tmp_path, template_name, serial)
    register = result.step("register_thing")
    assert register is not None and register.ok, (result.error, result.failure)
    assert result.thing_name == thing_name
    # LocationUrl comes from DeviceLocation, which only the hook supplies ("Seattle").
    assert dict(result.device_configuration) == {
        "FallbackUrl": "https://www.example.com/test-site", "LocationUrl": "https://example.aws"}

    # 6. describe-thing shows what the template made.
    thing = aws(live, "describe-thing", "--thing-name", thing_name)
    assert set(thing) == output_members(live.iot, "DescribeThing")
    assert {k: thing[k] for k in ("thingName", "thingTypeName", "attributes", "version",
                                  "billingGroupName", "defaultClientId")} == {
        "thingName": thing_name, "thingTypeName": f"ThingTypePrefix_{serial}",
        "attributes": {"version": "v1", "serialNumber": "serialNumber"}, "version": 1,
        "billingGroupName": "BillingGroup", "defaultClientId": thing_name}
    iot = live.iot
    device_arn = f"{ARN_PREFIX}cert/{result.certificate_id}"
    assert iot.list_thing_principals(thingName=thing_name)["principals"] == [device_arn]
    assert iot.describe_certificate(certificateId=result.certificate_id)[
        "certificateDescription"]["status"] == "ACTIVE"
    assert sorted(g["groupName"] for g in iot.list_thing_groups_for_thing(
        thingName=thing_name)["thingGroups"]) == ["WA", "widgets"]
    policies = iot.list_attached_policies(target=device_arn)["policies"]
    assert len(policies) == 1
    assert "topic/foo/bar" in iot.get_policy(policyName=policies[0]["policyName"])[
        "policyDocument"]


def _provision_device(live: Live, tmp_path: Path, template_name: str, serial: str) -> Any:
    """The virtual device runs the claim flow with the CLI-written claim files.

    The guide's template grants the new certificate only ``iot:Publish`` on ``foo/bar``
    (no ``iot:Connect``), so the device stops once it has left the claim connection.
    """
    from devices.base import ClaimCredentials, DeviceInputs, EndpointParams, Step
    from devices.virtual import StepControl, VirtualDevice, VirtualOptions

    inputs = DeviceInputs(
        endpoint=EndpointParams.from_endpoint_info(live.embedded.info),
        claim=ClaimCredentials.from_files(tmp_path / "claim.pem.crt",
                                          tmp_path / "claim.private.key"),
        template_name=template_name, serial=serial, workdir=tmp_path / "device", timeout_s=30)
    options = VirtualOptions(telemetry_topic=None, log_to_file=False,
                             control=StepControl(stop_after=Step.DISCONNECT_CLAIM))
    return VirtualDevice(options).provision(inputs)


# --------------------------------------------------------------------------- one call per family


def test_cli_creates_a_provisioning_claim(live: Live) -> None:
    # spec fleet §2.1: certificateId, certificatePem, keyPair, expiration; §6 and broker
    # §5.1: timestamps are epoch-second numbers on the wire, and awscli v1 prints them as
    # received (the guide's "creationDate": 1574800471.339)
    name = unique("trusted")
    live.iot.create_provisioning_template(templateName=name,
                                          templateBody=HOOK_TEMPLATE.read_text(),
                                          provisioningRoleArn=ROLE_ARN, enabled=True)
    claim = aws(live, "create-provisioning-claim", "--template-name", name)
    assert set(claim) == output_members(live.iot, "CreateProvisioningClaim")
    assert set(claim["keyPair"]) == {"PublicKey", "PrivateKey"}
    assert isinstance(claim["expiration"], (int, float))
    assert claim["certificateId"] == pki.certificate_id(claim["certificatePem"])


def test_cli_describe_endpoint_answers_the_mqtt_host(live: Live) -> None:
    # spec broker §5.3 DescribeEndpoint (iot:Data-ATS)
    answer = aws(live, "describe-endpoint", "--endpoint-type", "iot:Data-ATS")
    assert answer == {"endpointAddress": live.embedded.info.mqtt_server_name}


def test_cli_reports_aws_errors_and_changes_nothing(live: Live) -> None:
    # spec broker §5.2: the CLI prints botocore's "An error occurred (<Code>) when calling
    # the <Operation> operation: <message>" and fails
    missing = unique("nothing")
    with unchanged(live):
        done = run_aws(live, "describe-thing", "--thing-name", missing)
    assert done.returncode != 0 and done.stdout == ""
    assert ("An error occurred (ResourceNotFoundException) when calling the DescribeThing "
            f"operation: Thing {missing} cannot be found.") in done.stderr
