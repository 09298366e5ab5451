"""Things, thing principals and thing types in the registry (spec broker §3.4, §5.3, §5.4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.clock import Clock
from harness.emulator.registry import Registry, ThingPrincipalType
from harness.errors import (
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
    VersionConflictException,
)
from tests.test_registry_kit import EventLog, make_registry, raises_message, self_signed_pem


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(tmp_path: Path, clock: Clock) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db", clock=clock)
    yield reg
    reg.close()


def _cert_arn(registry: Registry) -> str:
    return registry.register_certificate_without_ca(certificate_pem=self_signed_pem()
                                                    ).certificate_arn


# -- things --------------------------------------------------------------------------------------

def test_create_thing_returns_name_arn_and_id(registry: Registry) -> None:
    # spec broker §5.3 CreateThing
    thing = registry.create_thing(thing_name="sensor-1",
                                  attribute_payload={"attributes": {"serial": "42"}})
    assert thing.thing_arn == registry.arn_prefix + "thing/sensor-1"
    described = registry.describe_thing(thing_name="sensor-1")
    assert (described.thing_id, described.version, dict(described.attributes)) == (
        thing.thing_id, 1, {"serial": "42"})
    assert described.default_client_id == "sensor-1"


def test_create_thing_is_idempotent_only_for_an_identical_configuration(registry: Registry
                                                                        ) -> None:
    # spec broker §5.4; aws-sdk-java#2234
    first = registry.create_thing(thing_name="t", attribute_payload={"attributes": {"a": "1"}})
    again = registry.create_thing(thing_name="t", attribute_payload={"attributes": {"a": "1"}})
    assert again.thing_id == first.thing_id
    with pytest.raises(ResourceAlreadyExistsException) as info:
        registry.create_thing(thing_name="t", attribute_payload={"attributes": {"a": "2"}})
    assert info.value.extra == {"resourceId": first.thing_id, "resourceArn": first.thing_arn}


def test_thing_name_and_attributes_are_validated_server_side(registry: Registry) -> None:
    # spec broker §5.4, §7 item 22
    message = raises_message(lambda: registry.create_thing(thing_name="no spaces"),
                             InvalidRequestException)
    assert message == ("1 validation error detected: Value 'no spaces' at 'thingName' failed to "
                       "satisfy constraint: Member must satisfy regular expression pattern: "
                       "[a-zA-Z0-9:_-]+")
    with pytest.raises(InvalidRequestException, match="length less than or equal to 128"):
        registry.create_thing(thing_name="x" * 129)
    message = raises_message(
        lambda: registry.create_thing(thing_name="t",
                                      attribute_payload={"attributes": {"k": "v v"}}),
        InvalidRequestException)
    assert ("at 'attributePayload.attributes' failed to satisfy constraint: Map value must"
            in message)
    assert "[a-zA-Z0-9_.,@/:#=\\[\\]-]*" in message
    with pytest.raises(InvalidRequestException, match="Map keys must satisfy"):
        registry.create_thing(thing_name="t", attribute_payload={"attributes": {"k k": "v"}})


def test_two_validation_errors_are_reported_together(registry: Registry) -> None:
    # spec broker §5.2: "N validation errors detected: ...; ..."
    message = raises_message(
        lambda: registry.create_thing(thing_name="a b", thing_type_name="c d"),
        InvalidRequestException)
    assert message.startswith("2 validation errors detected: Value 'a b' at 'thingName'")
    assert "; Value 'c d' at 'thingTypeName'" in message


def test_attributes_are_limited_to_three_without_a_thing_type(registry: Registry) -> None:
    # spec broker §5.4, §7 item 22
    four = {"attributes": {f"a{n}": "v" for n in range(4)}}
    with pytest.raises(InvalidRequestException, match="at most 3"):
        registry.create_thing(thing_name="t", attribute_payload=four)
    registry.create_thing_type(thing_type_name="kind")
    registry.create_thing(thing_name="t", thing_type_name="kind", attribute_payload=four)
    with pytest.raises(InvalidRequestException, match="at most 3"):
        registry.update_thing(thing_name="t", remove_thing_type=True)


def test_update_thing_replaces_or_merges_attributes_and_bumps_version(registry: Registry
                                                                      ) -> None:
    # spec broker §5.4: replace unless merge; with merge "" deletes; version increments
    registry.create_thing(thing_name="t", attribute_payload={"attributes": {"a": "1", "b": "2"}})
    registry.update_thing(thing_name="t",
                          attribute_payload={"attributes": {"b": "", "c": "3"}, "merge": True})
    assert dict(registry.describe_thing(thing_name="t").attributes) == {"a": "1", "c": "3"}
    registry.update_thing(thing_name="t", attribute_payload={"attributes": {"z": "9"}},
                          expected_version=2)
    thing = registry.describe_thing(thing_name="t")
    assert (dict(thing.attributes), thing.version) == ({"z": "9"}, 3)
    message = raises_message(lambda: registry.update_thing(thing_name="t", expected_version=1),
                             VersionConflictException)
    assert message == "The version for thing t does not match the expected version."
    with pytest.raises(ResourceNotFoundException):
        registry.update_thing(thing_name="missing")


def test_update_thing_sets_and_removes_the_thing_type(registry: Registry) -> None:
    # spec broker §5.3 UpdateThing (thingTypeName, removeThingType)
    registry.create_thing_type(thing_type_name="kind")
    registry.create_thing(thing_name="t")
    registry.update_thing(thing_name="t", thing_type_name="kind")
    assert registry.describe_thing(thing_name="t").thing_type_name == "kind"
    with pytest.raises(InvalidRequestException):
        registry.update_thing(thing_name="t", thing_type_name="kind", remove_thing_type=True)
    registry.update_thing(thing_name="t", remove_thing_type=True)
    assert registry.describe_thing(thing_name="t").thing_type_name is None


def test_delete_thing_semantics(registry: Registry) -> None:
    # spec broker §5.4, §7 item 20: missing → success; principals attached → refused
    registry.delete_thing(thing_name="never-existed")
    arn = _cert_arn(registry)
    registry.create_thing(thing_name="t")
    registry.attach_thing_principal(thing_name="t", principal=arn)
    message = raises_message(lambda: registry.delete_thing(thing_name="t"),
                             InvalidRequestException)
    assert message == "Cannot delete. Thing t is still attached to one or more principals"
    registry.detach_thing_principal(thing_name="t", principal=arn)
    with pytest.raises(VersionConflictException):
        registry.delete_thing(thing_name="t", expected_version=7)
    registry.delete_thing(thing_name="t", expected_version=1)
    with pytest.raises(ResourceNotFoundException):
        registry.describe_thing(thing_name="t")


def test_list_things_filters_and_pages_with_next_token(registry: Registry) -> None:
    # spec broker §5.3 ListThings; §5.1 nextToken/maxResults
    registry.create_thing_type(thing_type_name="lamp")
    for n in range(7):
        registry.create_thing(thing_name=f"t{n}", thing_type_name="lamp" if n % 2 else None,
                              attribute_payload={"attributes": {"fw": f"1.{n}"}})
    names: list[str] = []
    token = None
    while True:
        page = registry.list_things(max_results=3, next_token=token)
        names += [t.thing_name for t in page.things]
        token = page.next_token
        if token is None:
            break
    assert names == [f"t{n}" for n in range(7)]
    typed = registry.list_things(thing_type_name="lamp")
    assert [t.thing_name for t in typed.things] == ["t1", "t3", "t5"]
    exact = registry.list_things(attribute_name="fw", attribute_value="1.4")
    assert [t.thing_name for t in exact.things] == ["t4"]
    prefix = registry.list_things(attribute_name="fw", attribute_value="1.",
                                  use_prefix_attribute_value=True, max_results=5)
    assert len(prefix.things) == 5 and prefix.next_token is not None
    with pytest.raises(InvalidRequestException):
        registry.list_things(max_results=0)


def test_list_things_token_survives_deletions_between_pages(registry: Registry) -> None:
    # spec broker §5.1: a token is a position, not an offset
    for n in range(4):
        registry.create_thing(thing_name=f"t{n}")
    page = registry.list_things(max_results=2)
    registry.delete_thing(thing_name="t1")
    registry.delete_thing(thing_name="t2")
    rest = registry.list_things(next_token=page.next_token)
    assert [t.thing_name for t in rest.things] == ["t3"]


# -- principals ----------------------------------------------------------------------------------

def test_thing_principals_attach_list_and_detach(registry: Registry) -> None:
    # spec broker §5.3 AttachThingPrincipal / ListThingPrincipals(V2) / ListPrincipalThings
    arn = _cert_arn(registry)
    for name in ("a", "b"):
        registry.create_thing(thing_name=name)
        registry.attach_thing_principal(thing_name=name, principal=arn)
    assert registry.list_thing_principals(thing_name="a").principals == [arn]
    assert registry.list_principal_things(principal=arn).things == ["a", "b"]
    v2 = registry.list_thing_principals_v2(thing_name="a").thing_principal_objects
    assert [(o.principal, o.thing_principal_type) for o in v2] == [
        (arn, ThingPrincipalType.NON_EXCLUSIVE_THING)]
    assert registry.list_thing_principals_v2(
        thing_name="a", thing_principal_type="EXCLUSIVE_THING").thing_principal_objects == []
    registry.detach_thing_principal(thing_name="a", principal=arn)
    page = registry.list_principal_things(principal=arn, max_results=1)
    assert page.things == ["b"] and page.next_token is None
    message = raises_message(lambda: registry.list_thing_principals(thing_name="zzz"),
                             ResourceNotFoundException)
    assert message == ("Failed to list principals for thing zzz because the thing does not exist "
                       "in your account")


def test_exclusive_attachment_must_be_the_only_one(registry: Registry) -> None:
    # spec broker §3.4, §5.4 (UNCONFIRMED code InvalidRequestException)
    arn = _cert_arn(registry)
    for name in ("a", "b"):
        registry.create_thing(thing_name=name)
    registry.attach_thing_principal(thing_name="a", principal=arn,
                                    thing_principal_type="EXCLUSIVE_THING")
    with pytest.raises(InvalidRequestException):
        registry.attach_thing_principal(thing_name="b", principal=arn)
    registry.detach_thing_principal(thing_name="a", principal=arn)
    registry.attach_thing_principal(thing_name="a", principal=arn)
    registry.attach_thing_principal(thing_name="b", principal=arn)
    with pytest.raises(InvalidRequestException):
        registry.attach_thing_principal(thing_name="a", principal=arn,
                                        thing_principal_type="EXCLUSIVE_THING")
    with pytest.raises(InvalidRequestException, match="enum value set"):
        registry.attach_thing_principal(thing_name="a", principal=arn,
                                        thing_principal_type="SOMETIMES")


def test_attach_thing_principal_needs_an_existing_thing_and_certificate(registry: Registry
                                                                        ) -> None:
    # spec broker §5.3 AttachThingPrincipal errors
    arn = _cert_arn(registry)
    with pytest.raises(ResourceNotFoundException):
        registry.attach_thing_principal(thing_name="missing", principal=arn)
    registry.create_thing(thing_name="t")
    with pytest.raises(ResourceNotFoundException):
        registry.attach_thing_principal(thing_name="t",
                                        principal=registry.arn_prefix + "cert/" + "0" * 64)
    with pytest.raises(InvalidRequestException):
        registry.attach_thing_principal(thing_name="t", principal="nonsense")


def test_thing_principal_changes_fire_policies_changed(registry: Registry) -> None:
    # the connection's thing (and so its group policies) depends on these attachments
    arn = _cert_arn(registry)
    registry.create_thing(thing_name="t")
    events = EventLog()
    registry.add_listener(events)
    registry.attach_thing_principal(thing_name="t", principal=arn)
    registry.attach_thing_principal(thing_name="t", principal=arn)
    registry.detach_thing_principal(thing_name="t", principal=arn)
    assert [(e.kind.value, e.thing_name) for e in events.events] == [
        ("policies_changed", "t"), ("policies_changed", "t")]


# -- connection view -----------------------------------------------------------------------------

def test_connection_view_uses_the_thing_named_like_the_client_id(registry: Registry) -> None:
    # spec broker §3.4, §7 item 6
    arn = _cert_arn(registry)
    cert_id = arn.rsplit("/", 1)[1]
    registry.create_thing(thing_name="dev-1", attribute_payload={"attributes": {"room": "7"}})
    registry.attach_thing_principal(thing_name="dev-1", principal=arn)
    view = registry.connection_view(cert_id, "dev-1")
    assert view.thing is not None and view.thing.attributes == {"room": "7"}
    assert (view.is_attached, view.exclusive) == (True, False)
    other = registry.connection_view(cert_id, "someone-else")
    assert (other.thing, other.is_attached) == (None, False)


def test_connection_view_uses_an_exclusive_thing_whatever_the_client_id(registry: Registry
                                                                        ) -> None:
    # spec broker §3.4 (EXCLUSIVE_THING)
    arn = _cert_arn(registry)
    registry.create_thing(thing_name="dev-1")
    registry.attach_thing_principal(thing_name="dev-1", principal=arn,
                                    thing_principal_type="EXCLUSIVE_THING")
    view = registry.connection_view(arn.rsplit("/", 1)[1], "random-client")
    assert view.thing is not None and view.thing.thing_name == "dev-1"
    assert (view.is_attached, view.exclusive) == (True, True)
    with pytest.raises(ResourceNotFoundException):
        registry.connection_view("f" * 64, "x")


# -- thing types ---------------------------------------------------------------------------------

def test_thing_type_lifecycle(registry: Registry, clock: Clock) -> None:
    # spec broker §5.4: deprecation reversible; deprecated types take no new things; deletion
    # needs deprecation 5 minutes ago (2022 doc) and no things
    props = {"thingTypeDescription": "lamps", "searchableAttributes": ["room"]}
    created = registry.create_thing_type(thing_type_name="lamp", thing_type_properties=props)
    assert created.thing_type_arn == registry.arn_prefix + "thingtype/lamp"
    again = registry.create_thing_type(thing_type_name="lamp", thing_type_properties=props)
    assert again.thing_type_id == created.thing_type_id
    with pytest.raises(ResourceAlreadyExistsException):
        registry.create_thing_type(thing_type_name="lamp")
    registry.create_thing(thing_name="t", thing_type_name="lamp")
    with pytest.raises(InvalidRequestException, match="deprecated"):
        registry.delete_thing_type(thing_type_name="lamp")
    registry.deprecate_thing_type(thing_type_name="lamp")
    described = registry.describe_thing_type(thing_type_name="lamp")
    assert described.thing_type_metadata.deprecated
    assert described.thing_type_properties.searchable_attributes == ("room",)
    message = raises_message(lambda: registry.create_thing(thing_name="u", thing_type_name="lamp"),
                             InvalidRequestException)
    assert message == "Can not create new thing with depreated thing type:lamp"
    registry.deprecate_thing_type(thing_type_name="lamp", undo_deprecate=True)
    registry.create_thing(thing_name="u", thing_type_name="lamp")
    registry.deprecate_thing_type(thing_type_name="lamp")
    with pytest.raises(InvalidRequestException, match="300 seconds"):
        registry.delete_thing_type(thing_type_name="lamp")
    clock.advance(301)
    with pytest.raises(InvalidRequestException, match="while things use it"):
        registry.delete_thing_type(thing_type_name="lamp")
    registry.delete_thing(thing_name="t")
    registry.delete_thing(thing_name="u")
    registry.delete_thing_type(thing_type_name="lamp")
    with pytest.raises(ResourceNotFoundException):
        registry.describe_thing_type(thing_type_name="lamp")


def test_update_thing_type_changes_only_mqtt5_configuration(registry: Registry) -> None:
    # AWS's "Can only update mqtt5Configuration." (aws-cli#9884)
    registry.create_thing_type(thing_type_name="lamp")
    with pytest.raises(InvalidRequestException, match=r"Can only update mqtt5Configuration\."):
        registry.update_thing_type(thing_type_name="lamp",
                                   thing_type_properties={"searchableAttributes": ["x"]})
    config = {"propagatingAttributes": [{"userPropertyKey": "k", "connectionAttribute":
                                         "iot:ClientId"}]}
    registry.update_thing_type(thing_type_name="lamp",
                               thing_type_properties={"mqtt5Configuration": config})
    props = registry.describe_thing_type(thing_type_name="lamp").thing_type_properties
    assert props.mqtt5_configuration == config


def test_list_thing_types_pages_and_filters(registry: Registry) -> None:
    # spec broker §5.3 ListThingTypes
    for name in ("a", "b", "c"):
        registry.create_thing_type(thing_type_name=name)
    page = registry.list_thing_types(max_results=2)
    rest = registry.list_thing_types(next_token=page.next_token)
    assert [t.thing_type_name for t in page.thing_types + rest.thing_types] == ["a", "b", "c"]
    only = registry.list_thing_types(thing_type_name="b")
    assert [t.thing_type_name for t in only.thing_types] == ["b"]
