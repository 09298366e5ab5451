"""Thing groups and billing groups in the registry (spec broker §3.4, §5.3, §5.4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.emulator.registry import Registry, RegistrySettings
from harness.errors import (
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
    VersionConflictException,
)
from tests.test_registry_kit import ALLOW_ALL, EventLog, make_registry, self_signed_pem


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db")
    yield reg
    reg.close()


def _chain(registry: Registry, *names: str) -> None:
    parent = None
    for name in names:
        registry.create_thing_group(thing_group_name=name, parent_group_name=parent)
        parent = name


def test_describe_thing_group_gives_the_root_to_parent_chain(registry: Registry) -> None:
    # spec broker §5.3 DescribeThingGroup (rootToParentThingGroups)
    _chain(registry, "a", "b", "c")
    described = registry.describe_thing_group(thing_group_name="c")
    meta = described.thing_group_metadata
    assert meta.parent_group_name == "b"
    assert [(g.group_name, g.group_arn) for g in meta.root_to_parent_thing_groups] == [
        ("a", registry.arn_prefix + "thinggroup/a"), ("b", registry.arn_prefix + "thinggroup/b")]
    assert described.version == 1


def test_hierarchy_depth_is_at_most_seven(registry: Registry) -> None:
    # spec broker §5.4: depth ≤ 7
    _chain(registry, *[f"g{n}" for n in range(7)])
    with pytest.raises(InvalidRequestException, match="depth"):
        registry.create_thing_group(thing_group_name="g7", parent_group_name="g6")
    with pytest.raises(InvalidRequestException, match="does not exist"):
        registry.create_thing_group(thing_group_name="orphan", parent_group_name="nope")


def test_create_thing_group_is_idempotent_for_an_identical_definition(registry: Registry
                                                                      ) -> None:
    # spec broker §5.4 UNCONFIRMED (setting idempotent_create)
    props = {"thingGroupDescription": "fleet", "attributePayload": {"attributes": {"a": "1"}}}
    first = registry.create_thing_group(thing_group_name="g", thing_group_properties=props)
    again = registry.create_thing_group(thing_group_name="g", thing_group_properties=props)
    assert again.thing_group_id == first.thing_group_id
    with pytest.raises(ResourceAlreadyExistsException):
        registry.create_thing_group(thing_group_name="g")


def test_update_thing_group_merges_attributes_and_checks_the_version(registry: Registry) -> None:
    # spec broker §5.3 UpdateThingGroup
    registry.create_thing_group(thing_group_name="g", thing_group_properties={
        "attributePayload": {"attributes": {"a": "1"}}})
    result = registry.update_thing_group(
        thing_group_name="g", expected_version=1,
        thing_group_properties={"thingGroupDescription": "d",
                                "attributePayload": {"attributes": {"b": "2"}, "merge": True}})
    assert result.version == 2
    props = registry.describe_thing_group(thing_group_name="g").thing_group_properties
    assert props.thing_group_description == "d"
    assert props.attribute_payload.attributes == {"a": "1", "b": "2"}
    with pytest.raises(VersionConflictException):
        registry.update_thing_group(thing_group_name="g", thing_group_properties={},
                                    expected_version=1)


def test_membership_rules_per_thing(tmp_path: Path) -> None:
    # spec broker §5.4: ≤ 10 static groups per thing, at most one per hierarchy
    reg = make_registry(tmp_path / "r.db",
                        settings=RegistrySettings(max_thing_groups_per_thing=2))
    reg.create_thing(thing_name="t")
    _chain(reg, "root", "child")
    reg.create_thing_group(thing_group_name="sibling", parent_group_name="root")
    reg.add_thing_to_thing_group(thing_group_name="child", thing_name="t")
    reg.add_thing_to_thing_group(thing_group_name="child", thing_name="t")  # no-op
    with pytest.raises(InvalidRequestException, match="same hierarchy"):
        reg.add_thing_to_thing_group(thing_group_name="sibling", thing_name="t")
    # Moving within the hierarchy in one call works: removals go first.
    reg.update_thing_groups_for_thing(thing_name="t", thing_groups_to_add=["sibling"],
                                      thing_groups_to_remove=["child"])
    assert [g.group_name for g in reg.list_thing_groups_for_thing(thing_name="t").thing_groups] \
        == ["sibling"]
    for name in ("x", "y"):
        reg.create_thing_group(thing_group_name=name)
    reg.add_thing_to_thing_group(thing_group_name="x", thing_name="t")
    with pytest.raises(InvalidRequestException, match="maximum number of thing groups"):
        reg.add_thing_to_thing_group(thing_group_name="y", thing_name="t")
    reg.close()


def test_things_and_groups_can_be_named_by_arn(registry: Registry) -> None:
    # spec broker §5.3 AddThingToThingGroup: thingGroupName|thingGroupArn, thingName|thingArn
    group = registry.create_thing_group(thing_group_name="g")
    thing = registry.create_thing(thing_name="t")
    registry.add_thing_to_thing_group(thing_group_arn=group.thing_group_arn,
                                      thing_arn=thing.thing_arn)
    assert registry.list_things_in_thing_group(thing_group_name="g").things == ["t"]
    with pytest.raises(InvalidRequestException, match="Need to specify at least one"):
        registry.remove_thing_from_thing_group(thing_name="t")
    with pytest.raises(InvalidRequestException, match="does not match"):
        registry.remove_thing_from_thing_group(thing_group_name="other",
                                               thing_group_arn=group.thing_group_arn,
                                               thing_name="t")
    registry.remove_thing_from_thing_group(thing_group_name="g", thing_name="t")
    assert registry.list_things_in_thing_group(thing_group_name="g").things == []
    with pytest.raises(ResourceNotFoundException):
        registry.add_thing_to_thing_group(thing_group_name="missing", thing_name="t")


def test_list_things_in_thing_group_recursive(registry: Registry) -> None:
    # spec broker §5.3 ListThingsInThingGroup (recursive)
    _chain(registry, "root", "mid", "leaf")
    for thing, group in (("t-root", "root"), ("t-mid", "mid"), ("t-leaf", "leaf")):
        registry.create_thing(thing_name=thing)
        registry.add_thing_to_thing_group(thing_group_name=group, thing_name=thing)
    assert registry.list_things_in_thing_group(thing_group_name="mid").things == ["t-mid"]
    everything = registry.list_things_in_thing_group(thing_group_name="root", recursive=True,
                                                     max_results=2)
    rest = registry.list_things_in_thing_group(thing_group_name="root", recursive=True,
                                               next_token=everything.next_token)
    assert everything.things + rest.things == ["t-leaf", "t-mid", "t-root"]


def test_list_thing_groups_by_parent_prefix_and_recursion(registry: Registry) -> None:
    # spec broker §5.3 ListThingGroups
    _chain(registry, "root", "child", "grandchild")
    registry.create_thing_group(thing_group_name="other")
    names = [g.group_name for g in registry.list_thing_groups().thing_groups]
    assert names == ["child", "grandchild", "other", "root"]
    direct = registry.list_thing_groups(parent_group="root").thing_groups
    assert [g.group_name for g in direct] == ["child"]
    deep = registry.list_thing_groups(parent_group="root", recursive=True).thing_groups
    assert [g.group_name for g in deep] == ["child", "grandchild"]
    prefixed = registry.list_thing_groups(name_prefix_filter="ro").thing_groups
    assert [g.group_name for g in prefixed] == ["root"]


def test_group_policies_reach_member_things_through_ancestors(registry: Registry) -> None:
    # spec broker §3.4: policies of every static group of the thing and of its ancestors
    arn = registry.register_certificate_without_ca(certificate_pem=self_signed_pem()
                                                   ).certificate_arn
    cert_id = arn.rsplit("/", 1)[1]
    _chain(registry, "root", "leaf")
    registry.create_thing(thing_name="dev")
    registry.attach_thing_principal(thing_name="dev", principal=arn)
    registry.create_policy(policy_name="root-policy", policy_document=ALLOW_ALL)
    registry.attach_policy(policy_name="root-policy",
                           target=registry.arn_prefix + "thinggroup/root")
    events = EventLog()
    registry.add_listener(events)
    registry.add_thing_to_thing_group(thing_group_name="leaf", thing_name="dev")
    assert events.kinds() == ["policies_changed"]
    assert registry.connection_view(cert_id, "dev").policy_names == ("root-policy",)
    assert registry.connection_view(cert_id, "not-the-thing").policy_names == ()
    registry.remove_thing_from_thing_group(thing_group_name="leaf", thing_name="dev")
    assert registry.connection_view(cert_id, "dev").policy_documents == ()


def test_delete_thing_group_semantics(registry: Registry) -> None:
    # spec broker §5.4: members allowed (permissions vanish); children refused (UNCONFIRMED)
    _chain(registry, "root", "child")
    registry.create_thing(thing_name="t")
    registry.add_thing_to_thing_group(thing_group_name="child", thing_name="t")
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    registry.attach_policy(policy_name="p", target=registry.arn_prefix + "thinggroup/child")
    with pytest.raises(InvalidRequestException, match="child groups"):
        registry.delete_thing_group(thing_group_name="root")
    with pytest.raises(VersionConflictException):
        registry.delete_thing_group(thing_group_name="child", expected_version=5)
    registry.delete_thing_group(thing_group_name="child")
    registry.delete_thing_group(thing_group_name="child")  # missing: success
    assert registry.list_thing_groups_for_thing(thing_name="t").thing_groups == []
    assert registry.list_targets_for_policy(policy_name="p").targets == []
    registry.delete_thing_group(thing_group_name="root")


def test_deleting_a_thing_leaves_its_groups(registry: Registry) -> None:
    registry.create_thing_group(thing_group_name="g")
    registry.create_thing(thing_name="t")
    registry.add_thing_to_thing_group(thing_group_name="g", thing_name="t")
    registry.delete_thing(thing_name="t")
    assert registry.list_things_in_thing_group(thing_group_name="g").things == []


# -- billing groups ------------------------------------------------------------------------------

def test_billing_group_lifecycle(registry: Registry) -> None:
    # spec broker §5.3 billing groups; §5.4 one billing group per thing (UNCONFIRMED: refused)
    created = registry.create_billing_group(
        billing_group_name="bg", billing_group_properties={"billingGroupDescription": "d"})
    assert created.billing_group_arn == registry.arn_prefix + "billinggroup/bg"
    registry.create_billing_group(billing_group_name="bg",
                                  billing_group_properties={"billingGroupDescription": "d"})
    with pytest.raises(ResourceAlreadyExistsException):
        registry.create_billing_group(billing_group_name="bg")
    registry.create_billing_group(billing_group_name="other")
    registry.create_thing(thing_name="t", billing_group_name="bg")
    assert registry.describe_thing(thing_name="t").billing_group_name == "bg"
    with pytest.raises(InvalidRequestException, match="already in billing group bg"):
        registry.add_thing_to_billing_group(billing_group_name="other", thing_name="t")
    registry.create_thing(thing_name="u")
    registry.add_thing_to_billing_group(billing_group_arn=created.billing_group_arn,
                                        thing_name="u")
    assert registry.list_things_in_billing_group(billing_group_name="bg").things == ["t", "u"]
    registry.remove_thing_from_billing_group(billing_group_name="bg", thing_name="u")
    assert registry.describe_thing(thing_name="u").billing_group_name is None
    update = registry.update_billing_group(
        billing_group_name="bg", billing_group_properties={"billingGroupDescription": "new"},
        expected_version=1)
    assert update.version == 2
    described = registry.describe_billing_group(billing_group_name="bg")
    assert described.billing_group_properties.billing_group_description == "new"
    names = [g.group_name for g in registry.list_billing_groups(name_prefix_filter="b"
                                                                ).billing_groups]
    assert names == ["bg"]
    registry.delete_billing_group(billing_group_name="bg")
    assert registry.describe_thing(thing_name="t").billing_group_name is None
    with pytest.raises(ResourceNotFoundException):
        registry.describe_billing_group(billing_group_name="bg")
    with pytest.raises(ResourceNotFoundException):
        registry.create_thing(thing_name="v", billing_group_name="bg")
