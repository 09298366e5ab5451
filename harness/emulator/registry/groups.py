"""Static thing groups and billing groups (spec broker §3.4, §5.3, §5.4).

Group membership decides which group policies reach a connection, so every change
of it fires ``policies_changed``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from harness.emulator.registry.base import RegistryCore, TxView, read_op, tags_of, write_op
from harness.emulator.registry.events import RegistryEventKind
from harness.emulator.registry.paging import ordered, paginate
from harness.emulator.registry.records import (
    BillingGroup,
    GroupMembership,
    Thing,
    ThingGroup,
)
from harness.emulator.registry.results import (
    BillingGroupPage,
    GroupNameAndArn,
    ThingGroupDescription,
    ThingGroupMetadata,
    ThingGroupPage,
    ThingNamePage,
    VersionResult,
)
from harness.emulator.registry.tables import View
from harness.emulator.registry.things import apply_attribute_payload
from harness.errors import (
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
)


def _name_and_arn(group: ThingGroup | BillingGroup) -> GroupNameAndArn:
    return GroupNameAndArn(group.group_name, group.group_arn)


def _by_name(group: GroupNameAndArn) -> tuple[str]:
    return (group.group_name,)


class GroupsMixin(RegistryCore):
    # -- resolving name-or-ARN arguments -------------------------------------------------------
    def _named(self, kind: str, what: str, name: str | None, arn: str | None) -> str:
        """The name given directly or through an ARN of this account (they must agree)."""
        if name is None and arn is None:
            raise InvalidRequestException(
                f"Both {what}Arn and {what}Name are empty. Need to specify at least one of them")
        from_arn = None
        if arn is not None:
            from_arn = self._group_name_of(arn, kind)
            if from_arn is None:
                raise ResourceNotFoundException(f"{arn} is not a {kind} ARN of this account")
        if name is not None and from_arn is not None and name != from_arn:
            raise InvalidRequestException(
                f"{what}Arn does not match the specified {what}Name in the request")
        return name if name is not None else from_arn  # type: ignore[return-value]

    def _group_and_thing(self, view: View, group_name: str | None, group_arn: str | None,
                         thing_name: str | None, thing_arn: str | None
                         ) -> tuple[ThingGroup, Thing]:
        group = self._require_group(
            view, self._named("thinggroup", "thingGroup", group_name, group_arn))
        thing = self._require_thing(view, self._named("thing", "thing", thing_name, thing_arn))
        return group, thing

    def _descendants(self, view: View, group_name: str) -> list[ThingGroup]:
        out: list[ThingGroup] = []
        pending = [group_name]
        while pending:
            children = view.where(self._t.thing_groups, "parent", pending.pop())
            out.extend(children)
            pending.extend(c.thing_group_name for c in children)
        return out

    def _root(self, view: View, group: ThingGroup) -> str:
        ancestors = self._ancestors(view, group)
        return ancestors[0].thing_group_name if ancestors else group.thing_group_name

    # -- thing groups --------------------------------------------------------------------------
    @write_op("CreateThingGroup")
    def create_thing_group(self, view: TxView, *, thing_group_name: str,
                           parent_group_name: str | None = None,
                           thing_group_properties: Mapping[str, Any] | None = None,
                           tags: Sequence[Mapping[str, Any]] | None = None) -> ThingGroup:
        """Depth ≤ 7 and ≤ 100 children per group; idempotent for an identical definition
        (UNCONFIRMED, setting ``idempotent_create``)."""
        props = thing_group_properties or {}
        description = props.get("thingGroupDescription")
        attributes = apply_attribute_payload({}, props.get("attributePayload"))
        self._check_group_attributes(thing_group_name, attributes)
        existing = view.get(self._t.thing_groups, thing_group_name)
        if existing is not None:
            same = (existing.parent_group_name == parent_group_name
                    and existing.description == description
                    and dict(existing.attributes) == attributes)
            if same and self.settings.idempotent_create:
                return existing
            raise ResourceAlreadyExistsException(
                f"Thing Group {thing_group_name} already exists in current account with "
                "different properties", resourceId=existing.thing_group_id,
                resourceArn=existing.thing_group_arn)
        if parent_group_name is not None:
            parent = view.get(self._t.thing_groups, parent_group_name)
            if parent is None:
                raise InvalidRequestException(
                    f"Parent thing group {parent_group_name} does not exist")
            depth = len(self._ancestors(view, parent)) + 2
            if depth > self.settings.max_thing_group_depth:
                raise InvalidRequestException(
                    f"Thing group {thing_group_name} would be at depth {depth}; the maximum "
                    f"depth of a thing group hierarchy is {self.settings.max_thing_group_depth}")
            children = view.keys_where(self._t.thing_groups, "parent", parent_group_name)
            if len(children) >= self.settings.max_thing_group_children:
                raise InvalidRequestException(
                    f"Thing group {parent_group_name} already has the maximum number of child "
                    f"groups ({self.settings.max_thing_group_children})")
        return view.put(self._t.thing_groups, ThingGroup(
            thing_group_name=thing_group_name, thing_group_id=self._new_id(),
            thing_group_arn=self.arn("thinggroup", thing_group_name),
            parent_group_name=parent_group_name, description=description, attributes=attributes,
            version=1, creation_date=self._now(), tags=tags_of(tags)))

    def _check_group_attributes(self, name: str, attributes: Mapping[str, str]) -> None:
        limit = self.settings.max_attributes_with_type
        if len(attributes) > limit:
            raise InvalidRequestException(
                f"Thing group {name} has {len(attributes)} attributes; at most {limit} allowed")

    @read_op("DescribeThingGroup")
    def describe_thing_group(self, view: View, *, thing_group_name: str
                             ) -> ThingGroupDescription:
        group = self._require_group(view, thing_group_name)
        return ThingGroupDescription(
            thing_group_name=group.thing_group_name, thing_group_id=group.thing_group_id,
            thing_group_arn=group.thing_group_arn, version=group.version,
            thing_group_properties=group.thing_group_properties,
            thing_group_metadata=ThingGroupMetadata(
                parent_group_name=group.parent_group_name,
                root_to_parent_thing_groups=[_name_and_arn(g)
                                             for g in self._ancestors(view, group)],
                creation_date=group.creation_date))

    @write_op("UpdateThingGroup")
    def update_thing_group(self, view: TxView, *, thing_group_name: str,
                           thing_group_properties: Mapping[str, Any],
                           expected_version: int | None = None) -> VersionResult:
        group = self._require_group(view, thing_group_name)
        self._check_version("thing group", thing_group_name, group.version, expected_version)
        description = thing_group_properties.get("thingGroupDescription", group.description)
        attributes = apply_attribute_payload(group.attributes,
                                             thing_group_properties.get("attributePayload"))
        self._check_group_attributes(thing_group_name, attributes)
        updated = view.put(self._t.thing_groups, dataclasses.replace(
            group, description=description, attributes=attributes, version=group.version + 1))
        return VersionResult(updated.version)

    @write_op("DeleteThingGroup")
    def delete_thing_group(self, view: TxView, *, thing_group_name: str,
                           expected_version: int | None = None) -> None:
        """Members lose the group's policies; a missing group is success; child groups block
        it (UNCONFIRMED, setting ``refuse_delete_group_with_children``)."""
        group = view.get(self._t.thing_groups, thing_group_name)
        if group is None:
            return
        self._check_version("thing group", thing_group_name, group.version, expected_version)
        children = view.where(self._t.thing_groups, "parent", thing_group_name)
        if children and self.settings.refuse_delete_group_with_children:
            raise InvalidRequestException(
                f"Cannot delete thing group : {thing_group_name} when there are still child "
                "groups attached to it")
        for child in children:
            view.put(self._t.thing_groups,
                     dataclasses.replace(child, parent_group_name=group.parent_group_name))
        members = view.keys_where(self._t.group_members, "group", thing_group_name)
        attachments = view.keys_where(self._t.policy_targets, "target", group.thing_group_arn)
        for key in members:
            view.delete(self._t.group_members, key)
        for key in attachments:
            view.delete(self._t.policy_targets, key)
        view.delete(self._t.thing_groups, thing_group_name)
        if members or attachments or children:
            view.emit(RegistryEventKind.POLICIES_CHANGED)

    @read_op("ListThingGroups")
    def list_thing_groups(self, view: View, *, next_token: str | None = None,
                          max_results: int | None = None, parent_group: str | None = None,
                          name_prefix_filter: str | None = None, recursive: bool | None = None
                          ) -> ThingGroupPage:
        """All groups, or the children (``recursive``: descendants) of ``parent_group``."""
        if parent_group is not None:
            self._require_group(view, parent_group)
            groups = (self._descendants(view, parent_group) if recursive
                      else view.where(self._t.thing_groups, "parent", parent_group))
        else:
            groups = view.values(self._t.thing_groups)
        items = [_name_and_arn(g) for g in groups
                 if name_prefix_filter is None or g.thing_group_name.startswith(name_prefix_filter)]
        page, token = paginate(ordered(items, _by_name), next_token,
                               max_results or self.settings.default_max_results)
        return ThingGroupPage(page, token)

    def _add_member(self, view: TxView, group: ThingGroup, thing: Thing) -> None:
        key = (group.thing_group_name, thing.thing_name)
        if view.get(self._t.group_members, key) is not None:
            return
        current = [g for m in view.where(self._t.group_members, "thing", thing.thing_name)
                   if (g := view.get(self._t.thing_groups, m.thing_group_name)) is not None]
        limit = self.settings.max_thing_groups_per_thing
        if len(current) >= limit:
            raise InvalidRequestException(
                f"Thing {thing.thing_name} already belongs to the maximum number of thing "
                f"groups ({limit})")
        if self.settings.one_group_per_hierarchy:
            root = self._root(view, group)
            for other in current:
                if self._root(view, other) == root:
                    raise InvalidRequestException(
                        f"Thing {thing.thing_name} is already in thing group "
                        f"{other.thing_group_name} of the same hierarchy as "
                        f"{group.thing_group_name}")
        view.put(self._t.group_members,
                 GroupMembership(group.thing_group_name, thing.thing_name, self._now()))
        view.emit(RegistryEventKind.POLICIES_CHANGED, thing_name=thing.thing_name)

    def _remove_member(self, view: TxView, group_name: str, thing_name: str) -> None:
        key = (group_name, thing_name)
        if view.get(self._t.group_members, key) is not None:
            view.delete(self._t.group_members, key)
            view.emit(RegistryEventKind.POLICIES_CHANGED, thing_name=thing_name)

    @write_op("AddThingToThingGroup")
    def add_thing_to_thing_group(self, view: TxView, *, thing_group_name: str | None = None,
                                 thing_group_arn: str | None = None,
                                 thing_name: str | None = None, thing_arn: str | None = None,
                                 override_dynamic_groups: bool | None = None) -> None:
        """≤ 10 groups per thing, one per hierarchy; the thing gets the groups' policies."""
        group, thing = self._group_and_thing(view, thing_group_name, thing_group_arn,
                                             thing_name, thing_arn)
        self._add_member(view, group, thing)

    @write_op("RemoveThingFromThingGroup")
    def remove_thing_from_thing_group(self, view: TxView, *, thing_group_name: str | None = None,
                                      thing_group_arn: str | None = None,
                                      thing_name: str | None = None,
                                      thing_arn: str | None = None) -> None:
        group, thing = self._group_and_thing(view, thing_group_name, thing_group_arn,
                                             thing_name, thing_arn)
        self._remove_member(view, group.thing_group_name, thing.thing_name)

    @write_op("UpdateThingGroupsForThing")
    def update_thing_groups_for_thing(self, view: TxView, *, thing_name: str | None = None,
                                      thing_groups_to_add: Sequence[str] | None = None,
                                      thing_groups_to_remove: Sequence[str] | None = None,
                                      override_dynamic_groups: bool | None = None) -> None:
        """Removals first, so a thing can move within a hierarchy in one call."""
        if thing_name is None:
            raise InvalidRequestException("thingName is required")
        thing = self._require_thing(view, thing_name)
        for name in thing_groups_to_remove or ():
            self._remove_member(view, self._require_group(view, name).thing_group_name,
                                thing_name)
        for name in thing_groups_to_add or ():
            self._add_member(view, self._require_group(view, name), thing)

    @read_op("ListThingsInThingGroup")
    def list_things_in_thing_group(self, view: View, *, thing_group_name: str,
                                   recursive: bool | None = None, next_token: str | None = None,
                                   max_results: int | None = None) -> ThingNamePage:
        self._require_group(view, thing_group_name)
        names = [thing_group_name]
        if recursive:
            names += [g.thing_group_name for g in self._descendants(view, thing_group_name)]
        things = sorted({m.thing_name for n in names
                         for m in view.where(self._t.group_members, "group", n)})
        page, token = paginate([((t,), t) for t in things], next_token,
                               max_results or self.settings.default_max_results)
        return ThingNamePage(page, token)

    @read_op("ListThingGroupsForThing")
    def list_thing_groups_for_thing(self, view: View, *, thing_name: str,
                                    next_token: str | None = None,
                                    max_results: int | None = None) -> ThingGroupPage:
        self._require_thing(view, thing_name)
        items = [_name_and_arn(g) for m in view.where(self._t.group_members, "thing", thing_name)
                 if (g := view.get(self._t.thing_groups, m.thing_group_name)) is not None]
        page, token = paginate(ordered(items, _by_name), next_token,
                               max_results or self.settings.default_max_results)
        return ThingGroupPage(page, token)

    # -- billing groups ------------------------------------------------------------------------
    @write_op("CreateBillingGroup")
    def create_billing_group(self, view: TxView, *, billing_group_name: str,
                             billing_group_properties: Mapping[str, Any] | None = None,
                             tags: Sequence[Mapping[str, Any]] | None = None) -> BillingGroup:
        description = (billing_group_properties or {}).get("billingGroupDescription")
        existing = view.get(self._t.billing_groups, billing_group_name)
        if existing is not None:
            if existing.description == description and self.settings.idempotent_create:
                return existing
            raise ResourceAlreadyExistsException(
                f"Billing Group {billing_group_name} already exists in current account with "
                "different properties", resourceId=existing.billing_group_id,
                resourceArn=existing.billing_group_arn)
        return view.put(self._t.billing_groups, BillingGroup(
            billing_group_name=billing_group_name, billing_group_id=self._new_id(),
            billing_group_arn=self.arn("billinggroup", billing_group_name),
            description=description, version=1, creation_date=self._now(), tags=tags_of(tags)))

    @read_op("DescribeBillingGroup")
    def describe_billing_group(self, view: View, *, billing_group_name: str) -> BillingGroup:
        return self._require_billing_group(view, billing_group_name)

    @write_op("UpdateBillingGroup")
    def update_billing_group(self, view: TxView, *, billing_group_name: str,
                             billing_group_properties: Mapping[str, Any],
                             expected_version: int | None = None) -> VersionResult:
        group = self._require_billing_group(view, billing_group_name)
        self._check_version("billing group", billing_group_name, group.version, expected_version)
        description = billing_group_properties.get("billingGroupDescription", group.description)
        updated = view.put(self._t.billing_groups, dataclasses.replace(
            group, description=description, version=group.version + 1))
        return VersionResult(updated.version)

    @write_op("DeleteBillingGroup")
    def delete_billing_group(self, view: TxView, *, billing_group_name: str,
                             expected_version: int | None = None) -> None:
        """A missing group is success; its things leave it."""
        group = view.get(self._t.billing_groups, billing_group_name)
        if group is None:
            return
        self._check_version("billing group", billing_group_name, group.version, expected_version)
        for thing in view.where(self._t.things, "billing_group", billing_group_name):
            self._set_billing_group(view, thing, None)
        view.delete(self._t.billing_groups, billing_group_name)

    @read_op("ListBillingGroups")
    def list_billing_groups(self, view: View, *, next_token: str | None = None,
                            max_results: int | None = None,
                            name_prefix_filter: str | None = None) -> BillingGroupPage:
        items = [_name_and_arn(g) for g in view.values(self._t.billing_groups)
                 if name_prefix_filter is None
                 or g.billing_group_name.startswith(name_prefix_filter)]
        page, token = paginate(ordered(items, _by_name), next_token,
                               max_results or self.settings.default_max_results)
        return BillingGroupPage(page, token)

    def _set_billing_group(self, view: TxView, thing: Thing, name: str | None) -> None:
        view.put(self._t.things, dataclasses.replace(thing, billing_group_name=name))
        view.emit(RegistryEventKind.THING_CHANGED, thing_name=thing.thing_name)

    def _billing_group_and_thing(self, view: View, group_name: str | None,
                                 group_arn: str | None, thing_name: str | None,
                                 thing_arn: str | None) -> tuple[BillingGroup, Thing]:
        group = self._require_billing_group(
            view, self._named("billinggroup", "billingGroup", group_name, group_arn))
        thing = self._require_thing(view, self._named("thing", "thing", thing_name, thing_arn))
        return group, thing

    @write_op("AddThingToBillingGroup")
    def add_thing_to_billing_group(self, view: TxView, *, billing_group_name: str | None = None,
                                   billing_group_arn: str | None = None,
                                   thing_name: str | None = None, thing_arn: str | None = None
                                   ) -> None:
        """A thing is in at most one billing group (UNCONFIRMED: a second one is refused,
        setting ``refuse_second_billing_group``; else the thing moves)."""
        group, thing = self._billing_group_and_thing(view, billing_group_name, billing_group_arn,
                                                     thing_name, thing_arn)
        if thing.billing_group_name == group.billing_group_name:
            return
        if thing.billing_group_name is not None and self.settings.refuse_second_billing_group:
            raise InvalidRequestException(
                f"Thing {thing.thing_name} is already in billing group "
                f"{thing.billing_group_name}")
        self._set_billing_group(view, thing, group.billing_group_name)

    @write_op("RemoveThingFromBillingGroup")
    def remove_thing_from_billing_group(self, view: TxView, *,
                                        billing_group_name: str | None = None,
                                        billing_group_arn: str | None = None,
                                        thing_name: str | None = None,
                                        thing_arn: str | None = None) -> None:
        group, thing = self._billing_group_and_thing(view, billing_group_name, billing_group_arn,
                                                     thing_name, thing_arn)
        if thing.billing_group_name == group.billing_group_name:
            self._set_billing_group(view, thing, None)

    @read_op("ListThingsInBillingGroup")
    def list_things_in_billing_group(self, view: View, *, billing_group_name: str,
                                     next_token: str | None = None,
                                     max_results: int | None = None) -> ThingNamePage:
        self._require_billing_group(view, billing_group_name)
        things = view.where(self._t.things, "billing_group", billing_group_name)
        page, token = paginate(ordered(things, self._t.things.order), next_token,
                               max_results or self.settings.default_max_results)
        return ThingNamePage([t.thing_name for t in page], token)
