"""Thing groups and billing groups through boto3 against a live emulator (issue 4).

Spec: iot-broker-and-policy.md §5.3 "Thing groups" and "Billing groups", §5.4 (group
rules: one group per hierarchy, deletion, idempotent create, one billing group),
§5.1 nextToken paging.
"""

from __future__ import annotations

import datetime as dt

from tests.cp_live_kit import (
    ARN_PREFIX,
    Live,
    assert_item_members,
    assert_members,
    aws_error,
    emulator_fixture,
    paged_alike,
    unchanged,
    unique,
)

live = emulator_fixture()

#: DescribeThingGroup members that only dynamic thing groups carry.
DYNAMIC_ONLY = ("indexName", "queryString", "queryVersion", "status")


# --------------------------------------------------------------------------- thing groups


def test_create_and_describe_a_thing_group_hierarchy(live: Live) -> None:
    # spec broker §5.3 CreateThingGroup / DescribeThingGroup (parent, root-to-parent chain)
    iot = live.iot
    root, middle, leaf = unique("root"), unique("mid"), unique("leaf")
    properties = {"thingGroupDescription": "all bulbs",
                  "attributePayload": {"attributes": {"site": "SEA"}}}
    created = iot.create_thing_group(thingGroupName=root, thingGroupProperties=properties)
    assert_members(iot, "CreateThingGroup", created)
    assert created["thingGroupArn"] == f"{ARN_PREFIX}thinggroup/{root}"
    iot.create_thing_group(thingGroupName=middle, parentGroupName=root)
    iot.create_thing_group(thingGroupName=leaf, parentGroupName=middle)
    described = iot.describe_thing_group(thingGroupName=root)
    assert_members(iot, "DescribeThingGroup", described, absent=DYNAMIC_ONLY)
    assert (described["thingGroupId"], described["version"]) == (created["thingGroupId"], 1)
    assert described["thingGroupProperties"] == properties
    assert isinstance(described["thingGroupMetadata"]["creationDate"], dt.datetime)
    metadata = iot.describe_thing_group(thingGroupName=leaf)["thingGroupMetadata"]
    assert metadata["parentGroupName"] == middle
    assert metadata["rootToParentThingGroups"] == [
        {"groupName": root, "groupArn": f"{ARN_PREFIX}thinggroup/{root}"},
        {"groupName": middle, "groupArn": f"{ARN_PREFIX}thinggroup/{middle}"}]


def test_create_thing_group_again_with_the_same_properties_returns_it(live: Live) -> None:
    # spec broker §5.4 (UNCONFIRMED, RegistrySettings.idempotent_create): same as CreateThing
    iot = live.iot
    name = unique("same")
    first = iot.create_thing_group(thingGroupName=name)
    with unchanged(live):
        assert iot.create_thing_group(thingGroupName=name)["thingGroupId"] == \
            first["thingGroupId"]


def test_list_thing_groups_by_parent_prefix_and_recursion(live: Live) -> None:
    # spec broker §5.3 ListThingGroups: parentGroup, namePrefixFilter, recursive, paging
    iot = live.iot
    root = unique("lroot")
    children = sorted(f"{root}-c{n}" for n in range(3))
    iot.create_thing_group(thingGroupName=root)
    for child in children:
        iot.create_thing_group(thingGroupName=child, parentGroupName=root)
    grandchild = f"{children[0]}-g"
    iot.create_thing_group(thingGroupName=grandchild, parentGroupName=children[0])
    direct = iot.list_thing_groups(parentGroup=root)
    assert_members(iot, "ListThingGroups", direct, absent=("nextToken",))
    assert_item_members(iot, "ListThingGroups", direct["thingGroups"], "thingGroups")
    assert sorted(g["groupName"] for g in direct["thingGroups"]) == children
    everything = iot.list_thing_groups(parentGroup=root, recursive=True)["thingGroups"]
    assert sorted(g["groupName"] for g in everything) == sorted([*children, grandchild])
    by_prefix = [g["groupName"] for page in iot.get_paginator("list_thing_groups").paginate(
        namePrefixFilter=root, PaginationConfig={"PageSize": 2}) for g in page["thingGroups"]]
    assert sorted(by_prefix) == sorted([root, *children, grandchild])
    first = iot.list_thing_groups(namePrefixFilter=root, maxResults=2)
    assert len(first["thingGroups"]) == 2 and "nextToken" in first


def test_things_join_and_leave_thing_groups(live: Live) -> None:
    # spec broker §5.3 Add/RemoveThingToThingGroup, ListThingsInThingGroup (recursive),
    # ListThingGroupsForThing; §5.4 at most one group per hierarchy
    iot = live.iot
    parent, child, other = unique("par"), unique("chi"), unique("oth")
    iot.create_thing_group(thingGroupName=parent)
    child_arn = iot.create_thing_group(thingGroupName=child, parentGroupName=parent)[
        "thingGroupArn"]
    iot.create_thing_group(thingGroupName=other)
    thing, thing_by_arn = unique("member"), unique("byarn")
    iot.create_thing(thingName=thing)
    thing_arn = iot.create_thing(thingName=thing_by_arn)["thingArn"]
    assert iot.add_thing_to_thing_group(thingGroupName=child, thingName=thing)[
        "ResponseMetadata"]["HTTPStatusCode"] == 200
    iot.add_thing_to_thing_group(thingGroupArn=child_arn, thingArn=thing_arn)
    iot.add_thing_to_thing_group(thingGroupName=other, thingName=thing)

    in_child = iot.list_things_in_thing_group(thingGroupName=child)
    assert_members(iot, "ListThingsInThingGroup", in_child, absent=("nextToken",))
    assert sorted(in_child["things"]) == sorted([thing, thing_by_arn])
    assert iot.list_things_in_thing_group(thingGroupName=parent)["things"] == []
    assert sorted(iot.list_things_in_thing_group(thingGroupName=parent, recursive=True)[
        "things"]) == sorted([thing, thing_by_arn])
    groups = iot.list_thing_groups_for_thing(thingName=thing)
    assert_members(iot, "ListThingGroupsForThing", groups, absent=("nextToken",))
    assert sorted(g["groupName"] for g in groups["thingGroups"]) == sorted([child, other])

    with unchanged(live, lambda: iot.list_thing_groups_for_thing(thingName=thing)), \
            aws_error(iot, "InvalidRequestException", match="same hierarchy"):
        iot.add_thing_to_thing_group(thingGroupName=parent, thingName=thing)
    iot.remove_thing_from_thing_group(thingGroupName=child, thingName=thing)
    assert iot.list_things_in_thing_group(thingGroupName=child)["things"] == [thing_by_arn]
    assert [g["groupName"] for g in iot.list_thing_groups_for_thing(thingName=thing)[
        "thingGroups"]] == [other]


def test_update_thing_group_returns_its_new_version(live: Live) -> None:
    # spec broker §5.3 UpdateThingGroup → version; expectedVersion must match
    iot = live.iot
    name = unique("upd")
    iot.create_thing_group(thingGroupName=name)
    updated = iot.update_thing_group(thingGroupName=name, expectedVersion=1,
                                     thingGroupProperties={"thingGroupDescription": "v2"})
    assert_members(iot, "UpdateThingGroup", updated)
    assert updated["version"] == 2
    described = iot.describe_thing_group(thingGroupName=name)
    assert described["thingGroupProperties"]["thingGroupDescription"] == "v2"
    with unchanged(live, lambda: iot.describe_thing_group(thingGroupName=name)), \
            aws_error(iot, "VersionConflictException"):
        iot.update_thing_group(thingGroupName=name, expectedVersion=1,
                               thingGroupProperties={"thingGroupDescription": "v3"})


def test_delete_thing_group_with_members_but_not_with_children(live: Live) -> None:
    # spec broker §5.4: members do not block deletion; child groups do (UNCONFIRMED default,
    # RegistrySettings.refuse_delete_group_with_children); a missing group is success
    iot = live.iot
    parent, child, thing = unique("dpar"), unique("dchi"), unique("dthing")
    iot.create_thing_group(thingGroupName=parent)
    iot.create_thing_group(thingGroupName=child, parentGroupName=parent)
    iot.create_thing(thingName=thing)
    iot.add_thing_to_thing_group(thingGroupName=child, thingName=thing)
    with unchanged(live, lambda: iot.describe_thing_group(thingGroupName=parent)), \
            aws_error(iot, "InvalidRequestException", match="child groups"):
        iot.delete_thing_group(thingGroupName=parent)
    assert iot.delete_thing_group(thingGroupName=child)["ResponseMetadata"][
        "HTTPStatusCode"] == 200
    assert iot.list_thing_groups_for_thing(thingName=thing)["thingGroups"] == []
    iot.delete_thing_group(thingGroupName=parent)
    with aws_error(iot, "ResourceNotFoundException", f"Thing group {parent} cannot be found."):
        iot.describe_thing_group(thingGroupName=parent)
    with unchanged(live):
        iot.delete_thing_group(thingGroupName=parent)


# --------------------------------------------------------------------------- billing groups


def test_create_describe_update_and_list_billing_groups(live: Live) -> None:
    # spec broker §5.3 "Billing groups"
    iot = live.iot
    name = unique("bill")
    created = iot.create_billing_group(
        billingGroupName=name, billingGroupProperties={"billingGroupDescription": "fleet A"})
    assert_members(iot, "CreateBillingGroup", created)
    assert created["billingGroupArn"] == f"{ARN_PREFIX}billinggroup/{name}"
    described = iot.describe_billing_group(billingGroupName=name)
    assert_members(iot, "DescribeBillingGroup", described)
    assert (described["version"], described["billingGroupProperties"]) == (
        1, {"billingGroupDescription": "fleet A"})
    assert isinstance(described["billingGroupMetadata"]["creationDate"], dt.datetime)
    updated = iot.update_billing_group(
        billingGroupName=name, billingGroupProperties={"billingGroupDescription": "fleet B"})
    assert_members(iot, "UpdateBillingGroup", updated)
    assert updated["version"] == 2
    with unchanged(live):
        assert iot.create_billing_group(billingGroupName=name, billingGroupProperties={
            "billingGroupDescription": "fleet B"})["billingGroupId"] == created["billingGroupId"]
    listed = iot.list_billing_groups(namePrefixFilter=name)
    assert_members(iot, "ListBillingGroups", listed, absent=("nextToken",))
    assert listed["billingGroups"] == [{"groupName": name, "groupArn": created["billingGroupArn"]}]


def test_a_thing_is_in_at_most_one_billing_group(live: Live) -> None:
    # spec broker §5.4: one billing group per thing (UNCONFIRMED: a second is refused,
    # RegistrySettings.refuse_second_billing_group); Add/Remove/ListThingsInBillingGroup
    iot = live.iot
    first, second, thing = unique("bfirst"), unique("bsecond"), unique("bthing")
    for group in (first, second):
        iot.create_billing_group(billingGroupName=group)
    iot.create_thing(thingName=thing)
    assert iot.add_thing_to_billing_group(billingGroupName=first, thingName=thing)[
        "ResponseMetadata"]["HTTPStatusCode"] == 200
    assert iot.describe_thing(thingName=thing)["billingGroupName"] == first
    members = iot.list_things_in_billing_group(billingGroupName=first)
    assert_members(iot, "ListThingsInBillingGroup", members, absent=("nextToken",))
    assert members["things"] == [thing]
    with unchanged(live, lambda: iot.describe_thing(thingName=thing)), \
            aws_error(iot, "InvalidRequestException", match=first):
        iot.add_thing_to_billing_group(billingGroupName=second, thingName=thing)
    iot.remove_thing_from_billing_group(billingGroupName=first, thingName=thing)
    assert "billingGroupName" not in iot.describe_thing(thingName=thing)
    assert iot.list_things_in_billing_group(billingGroupName=first)["things"] == []
    iot.add_thing_to_billing_group(billingGroupName=second, thingName=thing)
    assert iot.describe_thing(thingName=thing)["billingGroupName"] == second


def test_delete_billing_group_releases_its_things(live: Live) -> None:
    # spec broker §5.3 DeleteBillingGroup; a missing group is success
    iot = live.iot
    group, thing = unique("bdel"), unique("bmember")
    iot.create_billing_group(billingGroupName=group)
    iot.create_thing(thingName=thing, billingGroupName=group)
    assert iot.delete_billing_group(billingGroupName=group)["ResponseMetadata"][
        "HTTPStatusCode"] == 200
    assert "billingGroupName" not in iot.describe_thing(thingName=thing)
    with aws_error(iot, "ResourceNotFoundException", f"Billing group {group} cannot be found."):
        iot.describe_billing_group(billingGroupName=group)
    with unchanged(live):
        iot.delete_billing_group(billingGroupName=group)


def test_group_listings_page_one_item_at_a_time(live: Live) -> None:
    # spec broker §5.1, §7 item 21: nextToken paging of the group listings gives what one
    # page gives
    iot = live.iot
    prefix = unique("pg")
    groups = [f"{prefix}-{n}" for n in range(3)]
    billing = [f"{prefix}-b{n}" for n in range(3)]
    things = [f"{prefix}-t{n}" for n in range(3)]
    for group, bill, thing in zip(groups, billing, things, strict=True):
        iot.create_thing_group(thingGroupName=group)
        iot.create_billing_group(billingGroupName=bill)
        iot.create_thing(thingName=thing, billingGroupName=billing[0])
        iot.add_thing_to_thing_group(thingGroupName=groups[0], thingName=thing)
    for group in groups[1:]:
        iot.add_thing_to_thing_group(thingGroupName=group, thingName=things[0])
    assert sorted(g["groupName"] for g in paged_alike(
        iot, "list_billing_groups", namePrefixFilter=prefix)) == sorted(billing)
    assert sorted(paged_alike(iot, "list_things_in_thing_group",
                              thingGroupName=groups[0])) == sorted(things)
    assert sorted(paged_alike(iot, "list_things_in_billing_group",
                              billingGroupName=billing[0])) == sorted(things)
    assert sorted(g["groupName"] for g in paged_alike(
        iot, "list_thing_groups_for_thing", thingName=things[0])) == sorted(groups)
