"""Fault plans and quotas through the admin API and the ``fleetbench emulator`` command.

Spec: iot-broker-and-policy.md §5.2 (admin errors share AWS's error shape); design.md
principle 1 (faults are an emulator-only extension, reached the same way wherever the
emulator runs); style.md (a configuration error names the file and the line).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from harness.admin_client import AdminApiError, AdminClient
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.faults import FaultPlan, FaultRule, reject
from harness.endpoints.local import emulator_command, wait_for_endpoint_file
from harness.observations import Kind
from tests.test_provisioning_kit import REGION, running_emulator, unique

PLAN: dict[str, Any] = {
    "seed": 11,
    "rules": [
        {"name": "no-things", "api": "CreateThing", "nth": 1,
         "reject": {"error_code": "ThrottlingException"}},
        {"api": "RegisterThing", "client_id": "sn-*", "drop_response": True},
    ],
}


@pytest.fixture(scope="module")
def emu() -> Iterator[EmbeddedEmulator]:
    with running_emulator() as emulator:
        yield emulator


@pytest.fixture
def admin(emu: EmbeddedEmulator) -> Iterator[AdminClient]:
    client = AdminClient(emu.info.api_url)
    yield client
    client.clear_faults()


def test_a_plan_put_through_the_admin_api_applies_and_counts(
        emu: EmbeddedEmulator, admin: AdminClient) -> None:
    assert admin.faults() == {"plan": {"seed": 0, "rules": []}, "rules": []}
    answer = admin.set_faults(PLAN)
    assert answer["plan"]["seed"] == 11
    assert answer["plan"]["rules"][0]["api"] == "iot:CreateThing"  # canonical name
    iot = boto3.client("iot", endpoint_url=emu.info.api_url, region_name=REGION,
                       aws_access_key_id="AKIDFLEETBENCH", aws_secret_access_key="secret",
                       config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(iot.exceptions.ThrottlingException):
        iot.create_thing(thingName=unique("t"))
    iot.create_thing(thingName=unique("t"))  # nth: 1 only
    counters = admin.faults()["rules"]
    assert counters[0] == {"index": 0, "rule": "no-things", "matched": 2, "applied": 1}
    assert counters[1]["matched"] == 0
    fault = admin.events(kinds=[Kind.FAULT])[-1]
    assert fault.detail["rule"] == "no-things" and fault.detail["api"] == "iot:CreateThing"


def test_a_bad_plan_is_refused_with_the_offending_key_and_the_old_plan_stays(
        admin: AdminClient) -> None:
    admin.set_faults(PLAN)
    bad = {"rules": [PLAN["rules"][0], {"api": "RegistrThing", "delay": 1}]}
    with pytest.raises(AdminApiError) as raised:
        admin.set_faults(bad)
    assert raised.value.status == 400 and raised.value.code == "InvalidRequestException"
    assert "rules[1].api: unknown API 'RegistrThing'" in raised.value.message
    assert admin.faults()["plan"]["seed"] == 11


def test_a_python_plan_can_be_sent_and_cleared(admin: AdminClient) -> None:
    plan = FaultPlan((FaultRule(reject("AccessDenied"), api="RegisterThing", times=2),), seed=5)
    assert admin.set_faults(plan)["plan"] == plan.to_wire()
    assert admin.clear_faults()["plan"]["rules"] == []


# --------------------------------------------------------------------------- the command


def _run_emulator(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(emulator_command(tmp_path / "data", extra_args=args),
                          capture_output=True, text=True, timeout=60)


def test_the_command_refuses_a_plan_with_a_syntax_error_naming_the_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("rules:\n  - api: RegisterThing\n    drop_response: true\n  - api: [\n")
    done = _run_emulator(tmp_path, "--faults", str(plan))
    assert done.returncode == 2
    assert f"{plan}:5: not valid YAML" in done.stderr
    assert not (tmp_path / "data" / "endpoint.json").exists()


def test_the_command_refuses_an_unknown_api_naming_the_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("seed: 1\nrules:\n  - api: RegisterThing\n    delay: 1\n"
                    "  - api: CreateKeysAndCertificat\n    drop_response: true\n")
    done = _run_emulator(tmp_path, "--faults", str(plan))
    assert done.returncode == 2
    assert f"{plan}:5: rules[1].api: unknown API 'CreateKeysAndCertificat'" in done.stderr


def test_the_command_refuses_a_bad_quota(tmp_path: Path) -> None:
    done = _run_emulator(tmp_path, "--quota", "RegisterThing=fast")
    assert done.returncode == 2 and "argument --quota" in done.stderr


def test_the_command_starts_with_quotas_and_a_plan_in_force(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("seed: 4\nrules:\n  - api: RegisterThing\n    nth: 1\n"
                    "    drop_response: true\n")
    data = tmp_path / "data"
    process = subprocess.Popen(
        emulator_command(data, extra_args=["--quotas", "aws", "--quota", "RegisterThing=50/s",
                                           "--faults", str(plan)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        info = wait_for_endpoint_file(data / "endpoint.json", process)
        admin = AdminClient(info.api_url)
        quotas = admin.quotas()
        assert quotas["RegisterThing"] == "50/s" and quotas["CreateKeysAndCertificate"] == "10/s"
        assert admin.faults()["plan"] == {"seed": 4, "rules": [
            {"api": "RegisterThing", "nth": 1, "drop_response": True}]}
    finally:
        process.terminate()
        process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()
    assert sys.executable  # the command ran with this interpreter (emulator_command)
