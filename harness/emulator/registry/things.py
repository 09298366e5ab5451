"""Things, their principals and thing types (spec broker §3.4, §5.3 "Things", §5.4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from harness.emulator.registry.base import RegistryCore, TxView, read_op, tags_of, write_op
from harness.emulator.registry.events import RegistryEventKind
from harness.emulator.registry.paging import ordered, paginate
from harness.emulator.registry.records import (
    Thing,
    ThingPrincipal,
    ThingPrincipalType,
    ThingType,
)
from harness.emulator.registry.results import (
    PrincipalPage,
    PrincipalThingPage,
    ThingNamePage,
    ThingPage,
    ThingPrincipalPage,
    ThingTypePage,
)
from harness.emulator.registry.tables import View
from harness.errors import (
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
)


def apply_attribute_payload(current: Mapping[str, str],
                            payload: Mapping[str, Any] | None) -> dict[str, str]:
    """Spec broker §5.4: ``attributes`` replace the map unless ``merge`` is true; with merge
    an empty value deletes that attribute. Empty values are never stored."""
    if payload is None:
        return dict(current)
    given = payload.get("attributes") or {}
    out = dict(current) if payload.get("merge") else {}
    for name, value in given.items():
        if value == "":
            out.pop(name, None)
        else:
            out[name] = value
    return out


class ThingsMixin(RegistryCore):
    # -- things --------------------------------------------------------------------------------
    def _usable_type(self, view: View, thing_type_name: str) -> ThingType:
        thing_type = self._require_thing_type(view, thing_type_name)
        if thing_type.deprecated:
            # AWS's own wording, typo included.
            raise InvalidRequestException(
                f"Can not create new thing with depreated thing type:{thing_type_name}")
        return thing_type

    def _check_attribute_count(self, thing_name: str, attributes: Mapping[str, str],
                               thing_type_name: str | None) -> None:
        limit = (self.settings.max_attributes_with_type if thing_type_name
                 else self.settings.max_attributes_without_type)
        if len(attributes) > limit:
            typed = "with" if thing_type_name else "without"
            raise InvalidRequestException(
                f"Thing {thing_name} has {len(attributes)} attributes; a thing {typed} a thing "
                f"type can have at most {limit}")

    @write_op("CreateThing")
    def create_thing(self, view: TxView, *, thing_name: str, thing_type_name: str | None = None,
                     attribute_payload: Mapping[str, Any] | None = None,
                     billing_group_name: str | None = None) -> Thing:
        """Idempotent for an identical configuration; a different one is refused (§5.4)."""
        if thing_type_name is not None:
            self._usable_type(view, thing_type_name)
        if billing_group_name is not None:
            self._require_billing_group(view, billing_group_name)
        attributes = apply_attribute_payload({}, attribute_payload)
        self._check_attribute_count(thing_name, attributes, thing_type_name)
        existing = view.get(self._t.things, thing_name)
        if existing is not None:
            same = (existing.thing_type_name == thing_type_name
                    and dict(existing.attributes) == attributes
                    and existing.billing_group_name == billing_group_name)
            if same:
                return existing
            raise ResourceAlreadyExistsException(
                f"Thing {thing_name} already exists in account with different attributes",
                resourceId=existing.thing_id, resourceArn=existing.thing_arn)
        thing = view.put(self._t.things, Thing(
            thing_name=thing_name, thing_id=self._new_id(), thing_arn=self.arn("thing", thing_name),
            thing_type_name=thing_type_name, attributes=attributes, version=1,
            billing_group_name=billing_group_name, creation_date=self._now()))
        view.emit(RegistryEventKind.THING_CHANGED, thing_name=thing_name)
        return thing

    @read_op("DescribeThing")
    def describe_thing(self, view: View, *, thing_name: str) -> Thing:
        return self._require_thing(view, thing_name)

    @write_op("UpdateThing")
    def update_thing(self, view: TxView, *, thing_name: str, thing_type_name: str | None = None,
                     attribute_payload: Mapping[str, Any] | None = None,
                     expected_version: int | None = None,
                     remove_thing_type: bool | None = None) -> None:
        """Attributes replace unless ``merge``; every update increments ``version``."""
        thing = self._require_thing(view, thing_name)
        self._check_version("thing", thing_name, thing.version, expected_version)
        if thing_type_name is not None and remove_thing_type:
            raise InvalidRequestException(
                "thingTypeName and removeThingType cannot both be given")
        new_type = thing.thing_type_name
        if remove_thing_type:
            new_type = None
        elif thing_type_name is not None:
            self._usable_type(view, thing_type_name)
            new_type = thing_type_name
        attributes = apply_attribute_payload(thing.attributes, attribute_payload)
        self._check_attribute_count(thing_name, attributes, new_type)
        view.put(self._t.things, dataclasses.replace(
            thing, thing_type_name=new_type, attributes=attributes, version=thing.version + 1))
        view.emit(RegistryEventKind.THING_CHANGED, thing_name=thing_name)

    @write_op("DeleteThing")
    def delete_thing(self, view: TxView, *, thing_name: str,
                     expected_version: int | None = None) -> None:
        """A missing thing is success; one with principals is refused (§5.4)."""
        thing = view.get(self._t.things, thing_name)
        if thing is None:
            return
        self._check_version("thing", thing_name, thing.version, expected_version)
        if view.keys_where(self._t.thing_principals, "thing", thing_name):
            raise InvalidRequestException(
                f"Cannot delete. Thing {thing_name} is still attached to one or more principals")
        memberships = view.keys_where(self._t.group_members, "thing", thing_name)
        for key in memberships:
            view.delete(self._t.group_members, key)
        if memberships:
            view.emit(RegistryEventKind.POLICIES_CHANGED, thing_name=thing_name)
        view.delete(self._t.things, thing_name)
        view.emit(RegistryEventKind.THING_CHANGED, thing_name=thing_name)

    @read_op("ListThings")
    def list_things(self, view: View, *, next_token: str | None = None,
                    max_results: int | None = None, attribute_name: str | None = None,
                    attribute_value: str | None = None, thing_type_name: str | None = None,
                    use_prefix_attribute_value: bool | None = None) -> ThingPage:
        table = self._t.things

        def value_matches(value: str) -> bool:
            assert attribute_value is not None
            return (value.startswith(attribute_value) if use_prefix_attribute_value
                    else value == attribute_value)

        def keep(thing: Thing | None) -> bool:
            if thing is None:
                return False
            if thing_type_name is not None and thing.thing_type_name != thing_type_name:
                return False
            if attribute_name is not None:
                value = thing.attributes.get(attribute_name)
                return value is not None and (attribute_value is None or value_matches(value))
            if attribute_value is not None:
                return any(value_matches(v) for v in thing.attributes.values())
            return True

        limit = max_results or self.settings.default_max_results
        if thing_type_name is not None:
            things, token = paginate(ordered(view.where(table, "type", thing_type_name),
                                             table.order), next_token, limit, keep=keep)
            return ThingPage(things, token)
        names, token = paginate(view.ordered(table), next_token, limit,
                                keep=lambda name: keep(view.get(table, name)))
        return ThingPage([t for n in names if (t := view.get(table, n))], token)

    # -- principals ----------------------------------------------------------------------------
    def _principal(self, view: View, principal: str) -> str:
        """The canonical principal: an existing certificate's ARN, or a Cognito id."""
        cert_id = self._certificate_id_of(principal)
        if cert_id is not None:
            return self._require_certificate(view, cert_id).certificate_arn
        if principal.startswith("arn:") or ":" not in principal:
            raise InvalidRequestException(
                f"Invalid principal {principal}: expected a certificate ARN of this account or "
                "a Cognito identity id")
        return principal

    @write_op("AttachThingPrincipal")
    def attach_thing_principal(self, view: TxView, *, thing_name: str, principal: str,
                               thing_principal_type: str | None = None) -> None:
        """An EXCLUSIVE_THING attachment must be the principal's only one (UNCONFIRMED code,
        §5.4: InvalidRequestException)."""
        self._require_thing(view, thing_name)
        principal = self._principal(view, principal)
        kind = ThingPrincipalType(thing_principal_type or ThingPrincipalType.NON_EXCLUSIVE_THING)
        others = [a for a in view.where(self._t.thing_principals, "principal", principal)
                  if a.thing_name != thing_name]
        if others and (kind is ThingPrincipalType.EXCLUSIVE_THING or any(
                a.thing_principal_type is ThingPrincipalType.EXCLUSIVE_THING for a in others)):
            raise InvalidRequestException(
                f"Principal {principal} cannot be attached to thing {thing_name}: it is attached "
                f"to thing {others[0].thing_name} and an exclusive attachment must be the only "
                "one")
        current = view.get(self._t.thing_principals, (thing_name, principal))
        if current is not None and current.thing_principal_type is kind:
            return
        view.put(self._t.thing_principals,
                 ThingPrincipal(thing_name, principal, kind, self._now()))
        view.emit(RegistryEventKind.POLICIES_CHANGED, thing_name=thing_name,
                  certificate_id=self._certificate_id_of(principal))

    @write_op("DetachThingPrincipal")
    def detach_thing_principal(self, view: TxView, *, thing_name: str, principal: str) -> None:
        """Immediate here (AWS: asynchronous, "several seconds")."""
        self._require_thing(view, thing_name)
        cert_id = self._certificate_id_of(principal)
        if cert_id is not None:
            principal = self.arn("cert", cert_id)
        if view.get(self._t.thing_principals, (thing_name, principal)) is not None:
            view.delete(self._t.thing_principals, (thing_name, principal))
            view.emit(RegistryEventKind.POLICIES_CHANGED, thing_name=thing_name,
                      certificate_id=cert_id)

    def _principals_of(self, view: View, thing_name: str, kind: str | None
                       ) -> list[ThingPrincipal]:
        if view.get(self._t.things, thing_name) is None:
            raise ResourceNotFoundException(
                f"Failed to list principals for thing {thing_name} because the thing does not "
                "exist in your account")
        return [a for a in view.where(self._t.thing_principals, "thing", thing_name)
                if kind is None or a.thing_principal_type.value == kind]

    @read_op("ListThingPrincipals")
    def list_thing_principals(self, view: View, *, thing_name: str,
                              next_token: str | None = None, max_results: int | None = None
                              ) -> PrincipalPage:
        attachments = self._principals_of(view, thing_name, None)
        page, token = paginate(ordered(attachments, self._t.thing_principals.order), next_token,
                               max_results or self.settings.default_max_results)
        return PrincipalPage([a.principal for a in page], token)

    @read_op("ListThingPrincipalsV2")
    def list_thing_principals_v2(self, view: View, *, thing_name: str,
                                 next_token: str | None = None, max_results: int | None = None,
                                 thing_principal_type: str | None = None) -> ThingPrincipalPage:
        attachments = self._principals_of(view, thing_name, thing_principal_type)
        page, token = paginate(ordered(attachments, self._t.thing_principals.order), next_token,
                               max_results or self.settings.default_max_results)
        return ThingPrincipalPage(page, token)

    def _things_of(self, view: View, principal: str, kind: str | None) -> list[ThingPrincipal]:
        principal = self._principal(view, principal)
        return [a for a in view.where(self._t.thing_principals, "principal", principal)
                if kind is None or a.thing_principal_type.value == kind]

    @read_op("ListPrincipalThings")
    def list_principal_things(self, view: View, *, principal: str,
                              next_token: str | None = None, max_results: int | None = None
                              ) -> ThingNamePage:
        attachments = self._things_of(view, principal, None)
        page, token = paginate(ordered(attachments, self._t.thing_principals.order), next_token,
                               max_results or self.settings.default_max_results)
        return ThingNamePage([a.thing_name for a in page], token)

    @read_op("ListPrincipalThingsV2")
    def list_principal_things_v2(self, view: View, *, principal: str,
                                 next_token: str | None = None, max_results: int | None = None,
                                 thing_principal_type: str | None = None) -> PrincipalThingPage:
        attachments = self._things_of(view, principal, thing_principal_type)
        page, token = paginate(ordered(attachments, self._t.thing_principals.order), next_token,
                               max_results or self.settings.default_max_results)
        return PrincipalThingPage(page, token)

    # -- thing types ---------------------------------------------------------------------------
    def _require_thing_type(self, view: View, name: str) -> ThingType:
        return self._require(view, self._t.thing_types, name,
                             f"Thing type {name} cannot be found.")

    @write_op("CreateThingType")
    def create_thing_type(self, view: TxView, *, thing_type_name: str,
                          thing_type_properties: Mapping[str, Any] | None = None,
                          tags: Sequence[Mapping[str, Any]] | None = None) -> ThingType:
        """Idempotent for identical properties (UNCONFIRMED, setting ``idempotent_create``)."""
        props = thing_type_properties or {}
        description = props.get("thingTypeDescription")
        searchable = tuple(props.get("searchableAttributes") or ())
        mqtt5 = props.get("mqtt5Configuration")
        existing = view.get(self._t.thing_types, thing_type_name)
        if existing is not None:
            same = (existing.description == description
                    and existing.searchable_attributes == searchable
                    and existing.mqtt5_configuration == mqtt5)
            if same and self.settings.idempotent_create:
                return existing
            raise ResourceAlreadyExistsException(
                f"Thing type {thing_type_name} already exists in account with different "
                "properties", resourceId=existing.thing_type_id,
                resourceArn=existing.thing_type_arn)
        return view.put(self._t.thing_types, ThingType(
            thing_type_name=thing_type_name, thing_type_id=self._new_id(),
            thing_type_arn=self.arn("thingtype", thing_type_name), description=description,
            searchable_attributes=searchable, mqtt5_configuration=mqtt5, deprecated=False,
            deprecation_date=None, creation_date=self._now(), tags=tags_of(tags)))

    @read_op("DescribeThingType")
    def describe_thing_type(self, view: View, *, thing_type_name: str) -> ThingType:
        return self._require_thing_type(view, thing_type_name)

    @write_op("UpdateThingType")
    def update_thing_type(self, view: TxView, *, thing_type_name: str,
                          thing_type_properties: Mapping[str, Any] | None = None) -> None:
        """Only ``mqtt5Configuration`` can change (AWS's message, aws-cli#9884)."""
        thing_type = self._require_thing_type(view, thing_type_name)
        props = thing_type_properties or {}
        if any(v is not None for k, v in props.items() if k != "mqtt5Configuration"):
            raise InvalidRequestException("Can only update mqtt5Configuration.")
        view.put(self._t.thing_types, dataclasses.replace(
            thing_type, mqtt5_configuration=props.get("mqtt5Configuration")))

    @write_op("DeprecateThingType")
    def deprecate_thing_type(self, view: TxView, *, thing_type_name: str,
                             undo_deprecate: bool | None = None) -> None:
        """Reversible; a deprecated type takes no new things."""
        thing_type = self._require_thing_type(view, thing_type_name)
        view.put(self._t.thing_types, dataclasses.replace(
            thing_type, deprecated=not undo_deprecate,
            deprecation_date=None if undo_deprecate else self._now()))

    @write_op("DeleteThingType")
    def delete_thing_type(self, view: TxView, *, thing_type_name: str) -> None:
        """Needs deprecation ``thing_type_delete_delay`` seconds ago and no things (2022 doc)."""
        thing_type = self._require_thing_type(view, thing_type_name)
        if not thing_type.deprecated or thing_type.deprecation_date is None:
            raise InvalidRequestException(
                f"Thing type {thing_type_name} must be deprecated before it can be deleted")
        delay = self.settings.thing_type_delete_delay
        if self._now() - thing_type.deprecation_date < delay:
            raise InvalidRequestException(
                f"Thing type {thing_type_name} can be deleted {delay:g} seconds after its "
                "deprecation")
        if view.keys_where(self._t.things, "type", thing_type_name):
            raise InvalidRequestException(
                f"Thing type {thing_type_name} cannot be deleted while things use it")
        view.delete(self._t.thing_types, thing_type_name)

    @read_op("ListThingTypes")
    def list_thing_types(self, view: View, *, next_token: str | None = None,
                         max_results: int | None = None, thing_type_name: str | None = None
                         ) -> ThingTypePage:
        names, token = paginate(view.ordered(self._t.thing_types), next_token,
                                max_results or self.settings.default_max_results,
                                keep=lambda name: thing_type_name in (None, name))
        return ThingTypePage([self._require_thing_type(view, n) for n in names], token)
