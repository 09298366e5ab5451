"""The registry behind the real control plane, driven by boto3 (design principle 1: the
code that prepares a run against AWS prepares it against the emulator)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from harness.emulator.controlplane import BackgroundServer, build_app
from harness.emulator.registry import Registry
from tests.test_registry_kit import ACCOUNT, ALLOW_ALL, REGION, make_registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db")
    yield reg
    reg.close()


@pytest.fixture
def iot(registry: Registry) -> Iterator[Any]:
    server = BackgroundServer(build_app(registry, region=REGION, account_id=ACCOUNT))
    server.start()
    yield boto3.client("iot", endpoint_url=server.url, region_name=REGION,
                       aws_access_key_id="x", aws_secret_access_key="y")
    server.stop()


def test_a_claim_setup_and_teardown_through_boto3(iot: Any) -> None:
    # spec broker §5.3, §5.4, §7 items 17-21
    keys = iot.create_keys_and_certificate(setAsActive=True)
    assert set(keys["keyPair"]) == {"PublicKey", "PrivateKey"}
    description = iot.describe_certificate(certificateId=keys["certificateId"])
    assert description["certificateDescription"]["status"] == "ACTIVE"
    iot.create_policy(policyName="claim", policyDocument=ALLOW_ALL)
    iot.attach_policy(policyName="claim", target=keys["certificateArn"])
    attached = iot.list_attached_policies(target=keys["certificateArn"])["policies"]
    assert [p["policyName"] for p in attached] == ["claim"]
    iot.create_thing(thingName="dev", attributePayload={"attributes": {"serial": "1"}})
    iot.attach_thing_principal(thingName="dev", principal=keys["certificateArn"],
                               thingPrincipalType="EXCLUSIVE_THING")
    with pytest.raises(iot.exceptions.InvalidRequestException, match="still attached"):
        iot.delete_thing(thingName="dev")
    with pytest.raises(iot.exceptions.CertificateStateException):
        iot.delete_certificate(certificateId=keys["certificateId"])
    iot.detach_thing_principal(thingName="dev", principal=keys["certificateArn"])
    iot.delete_thing(thingName="dev")
    iot.update_certificate(certificateId=keys["certificateId"], newStatus="INACTIVE")
    iot.delete_certificate(certificateId=keys["certificateId"], forceDelete=True)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_certificate(certificateId=keys["certificateId"])


def test_boto3_paginators_walk_both_pagination_styles(iot: Any) -> None:
    # spec broker §5.1, §7 item 21
    for n in range(5):
        iot.create_thing(thingName=f"t{n}")
        iot.create_policy(policyName=f"p{n}", policyDocument=ALLOW_ALL)
    things = [t["thingName"] for page in iot.get_paginator("list_things").paginate(
        PaginationConfig={"PageSize": 2}) for t in page["things"]]
    assert things == [f"t{n}" for n in range(5)]
    policies = [p["policyName"] for page in iot.get_paginator("list_policies").paginate(
        ascendingOrder=True, PaginationConfig={"PageSize": 2}) for p in page["policies"]]
    assert policies == [f"p{n}" for n in range(5)]


def test_aws_errors_reach_boto3_with_their_members(iot: Any) -> None:
    # spec broker §5.2, §7 item 16
    iot.create_thing(thingName="t", attributePayload={"attributes": {"a": "1"}})
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException) as info:
        iot.create_thing(thingName="t", attributePayload={"attributes": {"a": "2"}})
    assert info.value.response["resourceId"] == iot.describe_thing(thingName="t")["thingId"]
    with pytest.raises(iot.exceptions.InvalidRequestException, match="regular expression"):
        iot.update_thing(thingName="t", attributePayload={"attributes": {"a b": "x"}})
    with pytest.raises(iot.exceptions.VersionConflictException):
        iot.update_thing(thingName="t", expectedVersion=9)
