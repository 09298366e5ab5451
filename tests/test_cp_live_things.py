"""Things, their principals and thing types through boto3 against a live emulator
(issue 4).

Spec: iot-broker-and-policy.md §5.1 (URI labels, nextToken paging), §5.3 "Things" and
"Thing types", §5.4 (idempotent create, attributes, versions, deletion, thing types),
§7 items 18-22.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_create_and_describe_thing_return_aws_members(live: Live) -> None:
    # spec broker §5.3 CreateThing / DescribeThing: version starts at 1
    iot = live.iot
    name, thing_type, billing = unique("thing"), unique("type"), unique("bill")
    iot.create_thing_type(thingTypeName=thing_type)
    iot.create_billing_group(billingGroupName=billing)
    created = iot.create_thing(thingName=name, thingTypeName=thing_type,
                               attributePayload={"attributes": {"serial": "42"}},
                               billingGroupName=billing)
    assert_members(iot, "CreateThing", created)
    assert created["thingArn"] == f"{ARN_PREFIX}thing/{name}"
    described = iot.describe_thing(thingName=name)
    assert_members(iot, "DescribeThing", described)
    assert {k: v for k, v in described.items() if k != "ResponseMetadata"} == {
        "defaultClientId": name, "thingName": name, "thingId": created["thingId"],
        "thingArn": created["thingArn"], "thingTypeName": thing_type,
        "attributes": {"serial": "42"}, "version": 1, "billingGroupName": billing}


def test_create_thing_again_with_the_same_configuration_returns_the_same_thing(
        live: Live) -> None:
    # spec broker §5.4: CreateThing is idempotent for an identical configuration
    iot = live.iot
    name = unique("twice")
    payload = {"attributes": {"a": "1"}}
    first = iot.create_thing(thingName=name, attributePayload=payload)
    with unchanged(live):
        again = iot.create_thing(thingName=name, attributePayload=payload)
    assert {k: again[k] for k in ("thingName", "thingArn", "thingId")} == {
        k: first[k] for k in ("thingName", "thingArn", "thingId")}


def test_update_thing_replaces_or_merges_attributes_and_counts_versions(live: Live) -> None:
    # spec broker §5.4: replace unless merge; with merge "" deletes; version increments;
    # expectedVersion must match; removeThingType
    iot = live.iot
    name, thing_type = unique("upd"), unique("type")
    iot.create_thing_type(thingTypeName=thing_type)
    iot.create_thing(thingName=name, thingTypeName=thing_type,
                     attributePayload={"attributes": {"a": "1", "b": "2"}})
    iot.update_thing(thingName=name, attributePayload={"attributes": {"c": "3"}})
    assert iot.describe_thing(thingName=name)["attributes"] == {"c": "3"}
    iot.update_thing(thingName=name, expectedVersion=2,
                     attributePayload={"attributes": {"d": "4", "c": ""}, "merge": True})
    thing = iot.describe_thing(thingName=name)
    assert (thing["attributes"], thing["version"]) == ({"d": "4"}, 3)
    with unchanged(live, lambda: iot.describe_thing(thingName=name)), \
            aws_error(iot, "VersionConflictException"):
        iot.update_thing(thingName=name, expectedVersion=1,
                         attributePayload={"attributes": {"e": "5"}})
    iot.update_thing(thingName=name, removeThingType=True)
    assert "thingTypeName" not in iot.describe_thing(thingName=name)


def test_list_things_filters_by_attribute_and_type_and_pages(live: Live) -> None:
    # spec broker §5.3 ListThings: attributeName/attributeValue, usePrefixAttributeValue,
    # thingTypeName; nextToken/maxResults
    iot = live.iot
    batch, thing_type = unique("batch"), unique("type")
    iot.create_thing_type(thingTypeName=thing_type)
    names = [unique("lt") for _ in range(3)]
    for n, name in enumerate(names):
        typed = {"thingTypeName": thing_type} if n == 0 else {}
        iot.create_thing(thingName=name, **typed, attributePayload={
            "attributes": {"batch": batch, "slot": f"{batch}-{n}"}})
    by_value = iot.list_things(attributeName="batch", attributeValue=batch)
    assert_members(iot, "ListThings", by_value, absent=("nextToken",))
    items = {t["thingName"]: t for t in by_value["things"]}
    assert sorted(items) == sorted(names)
    assert_item_members(iot, "ListThings", [items[names[0]]], "things")
    assert_item_members(iot, "ListThings", [items[n] for n in names[1:]], "things",
                        absent=("thingTypeName",))
    assert items[names[0]]["thingTypeName"] == thing_type
    assert items[names[0]]["attributes"] == {"batch": batch, "slot": f"{batch}-0"}
    prefix = iot.list_things(attributeName="slot", attributeValue=f"{batch}-",
                             usePrefixAttributeValue=True)
    assert sorted(t["thingName"] for t in prefix["things"]) == sorted(names)
    exact = iot.list_things(attributeName="slot", attributeValue=f"{batch}-1")
    assert [t["thingName"] for t in exact["things"]] == [names[1]]
    typed = iot.list_things(thingTypeName=thing_type)
    assert [t["thingName"] for t in typed["things"]] == [names[0]]
    first = iot.list_things(attributeName="batch", attributeValue=batch, maxResults=2)
    assert len(first["things"]) == 2 and "nextToken" in first
    rest = iot.list_things(attributeName="batch", attributeValue=batch, maxResults=2,
                           nextToken=first["nextToken"])
    assert sorted(t["thingName"] for t in first["things"] + rest["things"]) == sorted(names)
    assert "nextToken" not in rest


def test_thing_principals_attach_list_both_ways_and_detach(live: Live) -> None:
    # spec broker §5.3 AttachThingPrincipal (principal in x-amzn-principal), ListThingPrincipals,
    # ListPrincipalThings, DetachThingPrincipal; §5.4 exclusive attachment
    iot = live.iot
    name, other = unique("owner"), unique("other")
    for thing in (name, other):
        iot.create_thing(thingName=thing)
    cert_arn = iot.create_keys_and_certificate(setAsActive=True)["certificateArn"]
    assert iot.attach_thing_principal(thingName=name, principal=cert_arn,
                                      thingPrincipalType="EXCLUSIVE_THING")[
        "ResponseMetadata"]["HTTPStatusCode"] == 200
    principals = iot.list_thing_principals(thingName=name)
    assert_members(iot, "ListThingPrincipals", principals, absent=("nextToken",))
    assert principals["principals"] == [cert_arn]
    things = iot.list_principal_things(principal=cert_arn)
    assert_members(iot, "ListPrincipalThings", things, absent=("nextToken",))
    assert things["things"] == [name]
    with unchanged(live, lambda: iot.list_principal_things(principal=cert_arn)), \
            aws_error(iot, "InvalidRequestException", match="exclusive"):
        iot.attach_thing_principal(thingName=other, principal=cert_arn)
    iot.detach_thing_principal(thingName=name, principal=cert_arn)
    assert iot.list_thing_principals(thingName=name)["principals"] == []
    assert iot.list_principal_things(principal=cert_arn)["things"] == []
    iot.attach_thing_principal(thingName=other, principal=cert_arn)
    assert iot.list_principal_things(principal=cert_arn)["things"] == [other]


def test_delete_thing_once_detached_and_deleting_a_missing_thing_succeeds(live: Live) -> None:
    # spec broker §5.4, §7 item 20: DeleteThing of a missing thing → 200
    iot = live.iot
    name = unique("gone")
    iot.create_thing(thingName=name)
    assert iot.delete_thing(thingName=name)["ResponseMetadata"]["HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException", f"Thing {name} cannot be found."):
        iot.describe_thing(thingName=name)
    with unchanged(live):
        iot.delete_thing(thingName=name)


def test_a_thing_without_a_type_has_at_most_three_attributes(live: Live) -> None:
    # spec broker §5.4, §7 item 22: ≤ 3 attributes without a thing type, ≤ 50 with one
    iot = live.iot
    name, thing_type = unique("attrs"), unique("type")
    four = {"attributes": {k: "v" for k in "abcd"}}
    with unchanged(live), aws_error(iot, "InvalidRequestException", match="at most 3"):
        iot.create_thing(thingName=name, attributePayload=four)
    iot.create_thing_type(thingTypeName=thing_type)
    iot.create_thing(thingName=name, thingTypeName=thing_type, attributePayload=four)
    assert len(iot.describe_thing(thingName=name)["attributes"]) == 4


def test_thing_types_create_describe_list_deprecate_and_delete(live: Live) -> None:
    # spec broker §5.3 "Thing types"; §5.4: deprecation is reversible, blocks new things,
    # deletion needs deprecation 5 minutes earlier (RegistrySettings.thing_type_delete_delay)
    iot = live.iot
    name = unique("type")
    props = {"thingTypeDescription": "bulbs", "searchableAttributes": ["serial"]}
    created = iot.create_thing_type(thingTypeName=name, thingTypeProperties=props)
    assert_members(iot, "CreateThingType", created)
    assert created["thingTypeArn"] == f"{ARN_PREFIX}thingtype/{name}"
    described = iot.describe_thing_type(thingTypeName=name)
    assert_members(iot, "DescribeThingType", described)
    assert described["thingTypeProperties"] == props
    assert described["thingTypeMetadata"]["deprecated"] is False
    assert isinstance(described["thingTypeMetadata"]["creationDate"], dt.datetime)
    listed = iot.list_thing_types(thingTypeName=name)
    assert_members(iot, "ListThingTypes", listed, absent=("nextToken",))
    assert_item_members(iot, "ListThingTypes", listed["thingTypes"], "thingTypes")
    assert [t["thingTypeName"] for t in listed["thingTypes"]] == [name]

    with unchanged(live), aws_error(iot, "InvalidRequestException", match="deprecated"):
        iot.delete_thing_type(thingTypeName=name)
    iot.deprecate_thing_type(thingTypeName=name)
    metadata = iot.describe_thing_type(thingTypeName=name)["thingTypeMetadata"]
    assert metadata["deprecated"] is True and isinstance(metadata["deprecationDate"],
                                                         dt.datetime)
    with unchanged(live), aws_error(
            iot, "InvalidRequestException",
            f"Can not create new thing with depreated thing type:{name}"):
        iot.create_thing(thingName=unique("late"), thingTypeName=name)
    iot.deprecate_thing_type(thingTypeName=name, undoDeprecate=True)
    iot.create_thing(thingName=unique("onetime"), thingTypeName=name)
    assert iot.describe_thing_type(thingTypeName=name)["thingTypeMetadata"]["deprecated"] is False

    unused = unique("unused")
    iot.create_thing_type(thingTypeName=unused)
    iot.deprecate_thing_type(thingTypeName=unused)
    with unchanged(live), aws_error(iot, "InvalidRequestException", match="seconds after"):
        iot.delete_thing_type(thingTypeName=unused)
    live.advance_clock(301)
    assert iot.delete_thing_type(thingTypeName=unused)["ResponseMetadata"][
        "HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException"):
        iot.describe_thing_type(thingTypeName=unused)


_THING_NAME = st.from_regex(r"[a-zA-Z0-9:_-]{1,40}", fullmatch=True)
_ATTRIBUTE_NAME = st.from_regex(r"[a-zA-Z0-9_.,@/:#-]{1,20}", fullmatch=True)
_ATTRIBUTE_VALUE = st.from_regex(r"[a-zA-Z0-9_.,@/:#=\[\]-]{1,30}", fullmatch=True)


@settings(max_examples=15, deadline=None)
@given(suffix=_THING_NAME,
       attributes=st.dictionaries(_ATTRIBUTE_NAME, _ATTRIBUTE_VALUE, max_size=3))
def test_any_valid_thing_name_and_attributes_round_trip(live: Live, suffix: str,
                                                        attributes: dict[str, str]) -> None:
    # spec broker §5.1 (labels percent-encoded, decoded as one segment; colons allowed),
    # §5.4 attribute character sets
    iot: Any = live.iot
    name = f"{unique('p')}{suffix}"
    iot.create_thing(thingName=name, attributePayload={"attributes": attributes})
    thing = iot.describe_thing(thingName=name)
    assert (thing["thingName"], thing["attributes"]) == (name, attributes)
    if attributes:
        key, value = next(iter(attributes.items()))
        found = iot.list_things(attributeName=key, attributeValue=value)["things"]
        assert name in [t["thingName"] for t in found]
    iot.delete_thing(thingName=name)


def test_type_and_principal_listings_page_one_item_at_a_time(live: Live) -> None:
    # spec broker §5.1, §7 item 21: nextToken paging of ListThingTypes, ListThingPrincipals
    # and ListPrincipalThings gives what one page gives
    iot = live.iot
    types = [unique("ptype") for _ in range(3)]
    for thing_type in types:
        iot.create_thing_type(thingTypeName=thing_type)
    listed = [t["thingTypeName"] for t in paged_alike(iot, "list_thing_types")]
    assert set(types) <= set(listed)
    holder, things = unique("holder"), [unique("shared") for _ in range(3)]
    certs = [iot.create_keys_and_certificate()["certificateArn"] for _ in range(3)]
    iot.create_thing(thingName=holder)
    for thing in things:
        iot.create_thing(thingName=thing)
        iot.attach_thing_principal(thingName=thing, principal=certs[0])
    for cert in certs:
        iot.attach_thing_principal(thingName=holder, principal=cert)
    assert sorted(paged_alike(iot, "list_thing_principals", thingName=holder)) == sorted(certs)
    assert sorted(paged_alike(iot, "list_principal_things", principal=certs[0])) == sorted(
        [holder, *things])
