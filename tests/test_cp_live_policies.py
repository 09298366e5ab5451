"""IoT policies, their versions and attachments through boto3 against a live emulator
(issue 4).

Spec: iot-broker-and-policy.md §3.1 (documents, versions), §5.1 (percent-encoded ARNs
in URI labels, marker paging), §5.3 "Policies", §5.4 (deletion, version rules),
§7 items 18-21.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from tests.cp_live_kit import (
    ALLOW_ALL,
    ARN_PREFIX,
    Live,
    assert_item_members,
    assert_members,
    aws_error,
    emulator_fixture,
    paged_alike,
    policy_document,
    unchanged,
    unique,
)

live = emulator_fixture()


def _certificate_arn(iot: Any) -> str:
    return str(iot.create_keys_and_certificate(setAsActive=True)["certificateArn"])


def test_create_and_get_policy_return_aws_members(live: Live) -> None:
    # spec broker §5.3 CreatePolicy / GetPolicy: version "1" is the default
    iot = live.iot
    name = unique("pol")
    created = iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    assert_members(iot, "CreatePolicy", created)
    assert created == {**created, "policyName": name, "policyArn": f"{ARN_PREFIX}policy/{name}",
                       "policyDocument": ALLOW_ALL, "policyVersionId": "1"}
    got = iot.get_policy(policyName=name)
    assert_members(iot, "GetPolicy", got)
    assert (got["policyDocument"], got["defaultVersionId"]) == (ALLOW_ALL, "1")
    assert isinstance(got["creationDate"], dt.datetime)
    assert got["lastModifiedDate"] >= got["creationDate"]


def test_list_policies_pages_by_marker(live: Live) -> None:
    # spec broker §5.1, §7 item 21: marker/pageSize/nextMarker, isAscendingOrder
    iot = live.iot
    names = [unique("listed") for _ in range(3)]
    for name in names:
        iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    first = iot.list_policies(pageSize=1)
    assert_members(iot, "ListPolicies", first)
    pages = list(iot.get_paginator("list_policies").paginate(
        ascendingOrder=True, PaginationConfig={"PageSize": 2}))
    listed = [p for page in pages for p in page["policies"]]
    assert_item_members(iot, "ListPolicies", listed, "policies")
    assert all(len(page["policies"]) <= 2 for page in pages)
    assert [p["policyName"] for p in listed if p["policyName"] in names] == names
    newest_first = [p["policyName"] for page in iot.get_paginator("list_policies").paginate()
                    for p in page["policies"]]
    assert [n for n in newest_first if n in names] == names[::-1]


def test_policy_versions_are_numbered_listed_and_switched(live: Live) -> None:
    # spec broker §3.1, §5.3 policy versions; §5.4 setAsDefault, ids never reused,
    # the default version cannot be deleted (UNCONFIRMED code: DeleteConflictException)
    iot = live.iot
    name = unique("versioned")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    second = iot.create_policy_version(policyName=name,
                                       policyDocument=policy_document("iot:Connect"))
    assert_members(iot, "CreatePolicyVersion", second)
    assert (second["policyVersionId"], second["isDefaultVersion"]) == ("2", False)
    third_doc = policy_document("iot:Publish")
    third = iot.create_policy_version(policyName=name, policyDocument=third_doc,
                                      setAsDefault=True)
    assert (third["policyVersionId"], third["isDefaultVersion"]) == ("3", True)
    got = iot.get_policy(policyName=name)
    assert (got["defaultVersionId"], got["policyDocument"]) == ("3", third_doc)

    version = iot.get_policy_version(policyName=name, policyVersionId="2")
    assert_members(iot, "GetPolicyVersion", version)
    assert (version["policyDocument"], version["isDefaultVersion"]) == (
        policy_document("iot:Connect"), False)
    versions = iot.list_policy_versions(policyName=name)
    assert_members(iot, "ListPolicyVersions", versions)
    assert_item_members(iot, "ListPolicyVersions", versions["policyVersions"], "policyVersions")
    assert {v["versionId"]: v["isDefaultVersion"] for v in versions["policyVersions"]} == {
        "1": False, "2": False, "3": True}

    iot.set_default_policy_version(policyName=name, policyVersionId="2")
    assert iot.get_policy(policyName=name)["defaultVersionId"] == "2"
    with unchanged(live), aws_error(iot, "DeleteConflictException", match="default version"):
        iot.delete_policy_version(policyName=name, policyVersionId="2")
    iot.delete_policy_version(policyName=name, policyVersionId="3")
    with aws_error(iot, "ResourceNotFoundException"):
        iot.get_policy_version(policyName=name, policyVersionId="3")
    fourth = iot.create_policy_version(policyName=name, policyDocument=third_doc)
    assert fourth["policyVersionId"] == "4"


def test_a_sixth_policy_version_is_refused(live: Live) -> None:
    # spec broker §5.4: at most five versions → VersionsLimitExceededException
    iot = live.iot
    name = unique("full")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    for n in range(4):
        iot.create_policy_version(policyName=name,
                                  policyDocument=policy_document(
                                      "iot:Connect", resource=f"{ARN_PREFIX}client/c{n}"))
    with unchanged(live, lambda: iot.list_policy_versions(policyName=name)), \
            aws_error(iot, "VersionsLimitExceededException"):
        iot.create_policy_version(policyName=name, policyDocument=policy_document("iot:Publish"),
                                  setAsDefault=True)


def test_attach_list_and_detach_a_policy_on_a_certificate_and_a_thing_group(
        live: Live) -> None:
    # spec broker §5.3 AttachPolicy / DetachPolicy (POST) / ListAttachedPolicies (ARN
    # percent-encoded in the path) / ListTargetsForPolicy; §7 items 18, 19
    iot = live.iot
    name = unique("attached")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    cert_arn = _certificate_arn(iot)
    group_arn = iot.create_thing_group(thingGroupName=unique("grp"))["thingGroupArn"]
    for target in (cert_arn, group_arn):
        assert iot.attach_policy(policyName=name, target=target)["ResponseMetadata"][
            "HTTPStatusCode"] == 200
    iot.attach_policy(policyName=name, target=cert_arn)  # attaching twice changes nothing
    attached = iot.list_attached_policies(target=cert_arn)
    assert_members(iot, "ListAttachedPolicies", attached, absent=("nextMarker",))
    assert attached["policies"] == [{"policyName": name, "policyArn": f"{ARN_PREFIX}policy/{name}"}]
    targets = iot.list_targets_for_policy(policyName=name)
    assert_members(iot, "ListTargetsForPolicy", targets, absent=("nextMarker",))
    assert sorted(targets["targets"]) == sorted([cert_arn, group_arn])

    iot.detach_policy(policyName=name, target=cert_arn)
    assert iot.list_attached_policies(target=cert_arn)["policies"] == []
    assert iot.list_targets_for_policy(policyName=name)["targets"] == [group_arn]
    with unchanged(live):  # detaching what is not attached is accepted and changes nothing
        iot.detach_policy(policyName=name, target=cert_arn)


def test_list_attached_policies_recursive_includes_the_parent_groups(live: Live) -> None:
    # spec broker §3.4: a thing group's policies apply to its children; §5.3 recursive
    iot = live.iot
    parent, child = unique("parent"), unique("child")
    iot.create_thing_group(thingGroupName=parent)
    child_arn = iot.create_thing_group(thingGroupName=child, parentGroupName=parent)[
        "thingGroupArn"]
    on_parent, on_child = unique("onparent"), unique("onchild")
    for policy, group in ((on_parent, parent), (on_child, child)):
        iot.create_policy(policyName=policy, policyDocument=ALLOW_ALL)
        iot.attach_policy(policyName=policy, target=f"{ARN_PREFIX}thinggroup/{group}")
    direct = iot.list_attached_policies(target=child_arn)["policies"]
    assert [p["policyName"] for p in direct] == [on_child]
    recursive = iot.list_attached_policies(target=child_arn, recursive=True)["policies"]
    assert sorted(p["policyName"] for p in recursive) == sorted([on_parent, on_child])


def test_delete_policy_after_detaching_and_deleting_its_other_versions(live: Live) -> None:
    # spec broker §5.4: attached or with non-default versions → DeleteConflictException;
    # the default version goes with the policy
    iot = live.iot
    name = unique("doomed")
    iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
    iot.create_policy_version(policyName=name, policyDocument=policy_document("iot:Connect"))
    with unchanged(live, lambda: iot.get_policy(policyName=name)), \
            aws_error(iot, "DeleteConflictException", match=name):
        iot.delete_policy(policyName=name)
    iot.delete_policy_version(policyName=name, policyVersionId="2")
    assert iot.delete_policy(policyName=name)["ResponseMetadata"]["HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException"):
        iot.get_policy(policyName=name)
    names = [p["policyName"] for page in iot.get_paginator("list_policies").paginate()
             for p in page["policies"]]
    assert name not in names


def test_a_policy_document_round_trips_byte_for_byte(live: Live) -> None:
    # spec broker §3.1: the document is stored as given (white space included)
    iot = live.iot
    name = unique("spaced")
    document = json.dumps(json.loads(ALLOW_ALL), indent=4)
    iot.create_policy(policyName=name, policyDocument=document)
    assert iot.get_policy(policyName=name)["policyDocument"] == document
    assert iot.get_policy_version(policyName=name, policyVersionId="1")["policyDocument"] == \
        document


def test_attachment_listings_page_one_item_at_a_time(live: Live) -> None:
    # spec broker §5.1, §7 item 21: ListAttachedPolicies and ListTargetsForPolicy pages
    iot = live.iot
    cert_arn = _certificate_arn(iot)
    names = [unique("paged") for _ in range(3)]
    for name in names:
        iot.create_policy(policyName=name, policyDocument=ALLOW_ALL)
        iot.attach_policy(policyName=name, target=cert_arn)
    more_targets = [_certificate_arn(iot) for _ in range(2)]
    for target in more_targets:
        iot.attach_policy(policyName=names[0], target=target)
    attached = paged_alike(iot, "list_attached_policies", target=cert_arn)
    assert sorted(p["policyName"] for p in attached) == sorted(names)
    targets = paged_alike(iot, "list_targets_for_policy", policyName=names[0])
    assert sorted(targets) == sorted([cert_arn, *more_targets])
