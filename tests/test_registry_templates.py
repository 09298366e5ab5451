"""Provisioning templates and versions in the registry (fleet-provisioning.md §3.6, §6)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.emulator.registry import Registry, RegistrySettings, TemplateType
from harness.emulator.templates import validate_template_body
from harness.errors import (
    DeleteConflictException,
    InvalidRequestException,
    LimitExceededException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
    VersionsLimitExceededException,
)
from tests.test_registry_kit import EventLog, make_registry, raises_message

ROLE = "arn:aws:iam::123456789012:role/Provisioning"
HOOK = {"targetArn": "arn:aws:lambda:us-east-1:123456789012:function:hook",
        "payloadVersion": "2020-04-01"}


def _body(thing: str = "dev") -> str:
    return json.dumps({"Resources": {"thing": {"Type": "AWS::IoT::Thing",
                                               "Properties": {"ThingName": thing}}}})


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db", template_validator=validate_template_body)
    yield reg
    reg.close()


def test_create_template_defaults_disabled_fleet_provisioning_version_1(registry: Registry
                                                                        ) -> None:
    # fleet-provisioning.md §3.6, §6.1
    created = registry.create_provisioning_template(template_name="widget",
                                                    template_body=_body(),
                                                    provisioning_role_arn=ROLE)
    assert (created.template_arn, created.default_version_id) == (
        registry.arn_prefix + "provisioningtemplate/widget", 1)
    described = registry.describe_provisioning_template(template_name="widget")
    assert described.enabled is False
    assert described.type is TemplateType.FLEET_PROVISIONING
    assert described.template_body == _body()
    assert described.pre_provisioning_hook is None


def test_duplicate_template_name_is_refused(registry: Registry) -> None:
    # fleet-provisioning.md §6.1 (observed message, S17)
    registry.create_provisioning_template(template_name="t", template_body=_body(),
                                          provisioning_role_arn=ROLE)
    message = raises_message(
        lambda: registry.create_provisioning_template(template_name="t", template_body=_body(),
                                                      provisioning_role_arn=ROLE),
        ResourceAlreadyExistsException)
    assert message == "Template with name t already exists"


def test_template_creation_is_validated(registry: Registry) -> None:
    # fleet-provisioning.md §3.7, §5: name pattern/length, body ≤ 10240, validator, hook type
    with pytest.raises(InvalidRequestException, match="regular expression pattern"):
        registry.create_provisioning_template(template_name="bad name", template_body="{}",
                                              provisioning_role_arn=ROLE)
    with pytest.raises(InvalidRequestException, match="less than or equal to 36"):
        registry.create_provisioning_template(template_name="x" * 37, template_body="{}",
                                              provisioning_role_arn=ROLE)
    with pytest.raises(InvalidRequestException, match="less than or equal to 10240"):
        registry.create_provisioning_template(template_name="big", template_body=" " * 10241,
                                              provisioning_role_arn=ROLE)
    with pytest.raises(InvalidRequestException, match="not one of"):
        registry.create_provisioning_template(
            template_name="badtype", provisioning_role_arn=ROLE,
            template_body=json.dumps({"Resources": {"x": {"Type": "AWS::IoT::Nope"}}}))
    with pytest.raises(InvalidRequestException, match="FLEET_PROVISIONING"):
        registry.create_provisioning_template(template_name="jitp", template_body="{}",
                                              provisioning_role_arn=ROLE, type="JITP",
                                              pre_provisioning_hook=HOOK)
    with pytest.raises(InvalidRequestException, match="greater than or equal to 20"):
        registry.create_provisioning_template(template_name="role", template_body="{}",
                                              provisioning_role_arn="arn:short")
    assert registry.list_provisioning_templates().templates == []


def test_without_a_validator_the_body_must_be_a_json_object(tmp_path: Path) -> None:
    reg = make_registry(tmp_path / "r.db")
    with pytest.raises(InvalidRequestException, match="JSON"):
        reg.create_provisioning_template(template_name="t", template_body="[1]",
                                         provisioning_role_arn=ROLE)
    reg.close()


def test_template_versions_default_and_limits(registry: Registry) -> None:
    # fleet-provisioning.md §3.6: integer ids, setAsDefault, ≤ 5 (UNCONFIRMED value), the
    # default version cannot be deleted (UNCONFIRMED), ids not reused
    registry.create_provisioning_template(template_name="t", template_body=_body("v1"),
                                          provisioning_role_arn=ROLE)
    second = registry.create_provisioning_template_version(template_name="t",
                                                           template_body=_body("v2"))
    assert (second.version_id, second.is_default_version) == (2, False)
    third = registry.create_provisioning_template_version(template_name="t",
                                                          template_body=_body("v3"),
                                                          set_as_default=True)
    assert (third.version_id, third.is_default_version) == (3, True)
    assert registry.describe_provisioning_template(template_name="t").template_body == _body("v3")
    for _ in range(2):
        registry.create_provisioning_template_version(template_name="t", template_body=_body())
    with pytest.raises(VersionsLimitExceededException):
        registry.create_provisioning_template_version(template_name="t", template_body=_body())
    with pytest.raises(DeleteConflictException):
        registry.delete_provisioning_template_version(template_name="t", version_id=3)
    registry.delete_provisioning_template_version(template_name="t", version_id=5)
    again = registry.create_provisioning_template_version(template_name="t",
                                                          template_body=_body())
    assert again.version_id == 6
    page = registry.list_provisioning_template_versions(template_name="t", max_results=3)
    rest = registry.list_provisioning_template_versions(template_name="t",
                                                        next_token=page.next_token)
    assert [(v.version_id, v.is_default_version) for v in page.versions + rest.versions] == [
        (1, False), (2, False), (3, True), (4, False), (6, False)]
    version = registry.describe_provisioning_template_version(template_name="t", version_id=2)
    assert version.template_body == _body("v2") and not version.is_default_version
    with pytest.raises(ResourceNotFoundException):
        registry.describe_provisioning_template_version(template_name="t", version_id=5)


def test_update_template_moves_the_default_and_manages_the_hook(registry: Registry) -> None:
    # fleet-provisioning.md §3.6, §4, §6.1 UpdateProvisioningTemplate
    registry.create_provisioning_template(template_name="t", template_body=_body("v1"),
                                          provisioning_role_arn=ROLE, enabled=True,
                                          pre_provisioning_hook=HOOK, description="first")
    registry.create_provisioning_template_version(template_name="t", template_body=_body("v2"))
    registry.update_provisioning_template(template_name="t", default_version_id=2,
                                          enabled=False, remove_pre_provisioning_hook=True)
    described = registry.describe_provisioning_template(template_name="t")
    assert (described.default_version_id, described.template_body) == (2, _body("v2"))
    assert (described.enabled, described.pre_provisioning_hook, described.description) == (
        False, None, "first")
    registry.update_provisioning_template(template_name="t", pre_provisioning_hook=HOOK)
    hook = registry.describe_provisioning_template(template_name="t").pre_provisioning_hook
    assert hook is not None and hook.target_arn == HOOK["targetArn"]
    with pytest.raises(ResourceNotFoundException):
        registry.update_provisioning_template(template_name="t", default_version_id=9)
    with pytest.raises(InvalidRequestException):
        registry.update_provisioning_template(template_name="t", pre_provisioning_hook=HOOK,
                                              remove_pre_provisioning_hook=True)
    with pytest.raises(ResourceNotFoundException):
        registry.update_provisioning_template(template_name="missing", enabled=True)


def test_delete_and_list_templates(registry: Registry) -> None:
    # fleet-provisioning.md §6
    for name in ("a", "b", "c"):
        registry.create_provisioning_template(template_name=name, template_body=_body(),
                                              provisioning_role_arn=ROLE)
    page = registry.list_provisioning_templates(max_results=2)
    rest = registry.list_provisioning_templates(next_token=page.next_token)
    assert [t.template_name for t in page.templates + rest.templates] == ["a", "b", "c"]
    assert page.templates[0].enabled is False
    registry.delete_provisioning_template(template_name="b")
    with pytest.raises(ResourceNotFoundException):
        registry.describe_provisioning_template(template_name="b")
    with pytest.raises(ResourceNotFoundException):
        registry.delete_provisioning_template(template_name="b")
    assert registry.dump()["template_versions"].keys() == {("a", 1), ("c", 1)}


def test_template_count_is_capped(tmp_path: Path) -> None:
    # fleet-provisioning.md §5 (quota L-345B62A1, value as a setting)
    reg = make_registry(tmp_path / "r.db", settings=RegistrySettings(max_provisioning_templates=1))
    reg.create_provisioning_template(template_name="a", template_body="{}",
                                     provisioning_role_arn=ROLE)
    with pytest.raises(LimitExceededException):
        reg.create_provisioning_template(template_name="b", template_body="{}",
                                         provisioning_role_arn=ROLE)
    reg.close()


def test_template_changes_fire_template_changed(registry: Registry) -> None:
    events = EventLog()
    registry.add_listener(events)
    registry.create_provisioning_template(template_name="t", template_body=_body(),
                                          provisioning_role_arn=ROLE)
    registry.update_provisioning_template(template_name="t", enabled=True)
    registry.delete_provisioning_template(template_name="t")
    assert [(e.kind.value, e.template_name) for e in events.events] == [
        ("template_changed", "t")] * 3
