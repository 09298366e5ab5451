"""IoT policies, versions and attachments in the registry (spec broker §3.1, §3.4, §5.3, §5.4)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.emulator.policy import parse_policy
from harness.emulator.registry import Registry, RegistrySettings
from harness.errors import (
    DeleteConflictException,
    InvalidRequestException,
    LimitExceededException,
    MalformedPolicyException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
    VersionsLimitExceededException,
)
from tests.test_registry_kit import (
    ALLOW_ALL,
    EventLog,
    make_registry,
    raises_message,
    self_signed_pem,
)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry.db", policy_parser=parse_policy)
    yield reg
    reg.close()


def _doc(action: str) -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]})


def _cert_arn(registry: Registry) -> str:
    return registry.register_certificate_without_ca(certificate_pem=self_signed_pem()
                                                    ).certificate_arn


def test_create_policy_makes_version_1_the_default(registry: Registry) -> None:
    # spec broker §3.1, §5.3
    created = registry.create_policy(policy_name="p", policy_document=ALLOW_ALL,
                                     tags=[{"Key": "team", "Value": "fw"}])
    assert (created.policy_name, created.policy_version_id) == ("p", "1")
    assert created.policy_arn == registry.arn_prefix + "policy/p"
    got = registry.get_policy(policy_name="p")
    assert (got.policy_document, got.default_version_id) == (ALLOW_ALL, "1")


def test_create_policy_with_an_existing_name_is_refused(registry: Registry) -> None:
    # spec broker §5.4
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    message = raises_message(
        lambda: registry.create_policy(policy_name="p", policy_document=ALLOW_ALL),
        ResourceAlreadyExistsException)
    assert message == "Policy cannot be created - name already exists (name=p)"


def test_malformed_policies_are_refused_by_the_injected_parser(registry: Registry) -> None:
    # spec broker §3.1: invalid JSON / grammar / size → MalformedPolicyException
    for document in ("{", json.dumps({"Statement": [{"Effect": "Maybe"}]}),
                     _doc("iot:" + "x" * 3000)):
        with pytest.raises(MalformedPolicyException):
            registry.create_policy(policy_name="bad", policy_document=document)
    with pytest.raises(ResourceNotFoundException):
        registry.get_policy(policy_name="bad")


def test_without_a_parser_a_minimal_check_applies(tmp_path: Path) -> None:
    # spec broker §3.1 (size ≤ 2048 characters excluding white space)
    reg = make_registry(tmp_path / "r.db")
    with pytest.raises(MalformedPolicyException):
        reg.create_policy(policy_name="p", policy_document="[]")
    with pytest.raises(MalformedPolicyException):
        reg.create_policy(policy_name="p", policy_document=_doc("x" * 2100))
    reg.create_policy(policy_name="p", policy_document=_doc("iot:Connect") + " " * 3000)
    reg.close()


def test_policy_name_pattern_is_checked_server_side(registry: Registry) -> None:
    # spec broker §3.1, §7 item 22: [\w+=,.@-]+ (ASCII \w, as in Java)
    message = raises_message(
        lambda: registry.create_policy(policy_name="bad name", policy_document=ALLOW_ALL),
        InvalidRequestException)
    assert message == ("1 validation error detected: Value 'bad name' at 'policyName' failed to "
                       "satisfy constraint: Member must satisfy regular expression pattern: "
                       "[\\w+=,.@-]+")
    with pytest.raises(InvalidRequestException):
        registry.create_policy(policy_name="pölicy", policy_document=ALLOW_ALL)
    registry.create_policy(policy_name="a+b=c,d.e@f-g_1", policy_document=ALLOW_ALL)


def test_policy_versions_are_capped_at_five_and_ids_never_reused(registry: Registry) -> None:
    # spec broker §3.1, §5.4
    registry.create_policy(policy_name="p", policy_document=_doc("iot:Connect"))
    events = EventLog()
    registry.add_listener(events)
    for n in range(2, 6):
        result = registry.create_policy_version(policy_name="p",
                                                policy_document=_doc(f"iot:V{n}"))
        assert (result.policy_version_id, result.is_default_version) == (str(n), False)
    assert events.kinds() == []
    message = raises_message(
        lambda: registry.create_policy_version(policy_name="p", policy_document=ALLOW_ALL),
        VersionsLimitExceededException)
    assert "maximum number of versions (5)" in message
    registry.delete_policy_version(policy_name="p", policy_version_id="5")
    result = registry.create_policy_version(policy_name="p", policy_document=ALLOW_ALL,
                                            set_as_default=True)
    assert (result.policy_version_id, result.is_default_version) == ("6", True)
    assert events.kinds() == ["policies_changed"]
    assert registry.get_policy(policy_name="p").policy_document == ALLOW_ALL
    listed = registry.list_policy_versions(policy_name="p").policy_versions
    assert [(v.version_id, v.is_default_version) for v in listed] == [
        ("6", True), ("4", False), ("3", False), ("2", False), ("1", False)]


def test_default_version_moves_and_cannot_be_deleted(registry: Registry) -> None:
    # spec broker §5.4 (UNCONFIRMED code DeleteConflictException)
    registry.create_policy(policy_name="p", policy_document=_doc("iot:Connect"))
    registry.create_policy_version(policy_name="p", policy_document=_doc("iot:Publish"))
    with pytest.raises(DeleteConflictException):
        registry.delete_policy_version(policy_name="p", policy_version_id="1")
    registry.set_default_policy_version(policy_name="p", policy_version_id="2")
    version = registry.get_policy_version(policy_name="p", policy_version_id="2")
    assert version.is_default_version and version.policy_document == _doc("iot:Publish")
    registry.delete_policy_version(policy_name="p", policy_version_id="1")
    with pytest.raises(ResourceNotFoundException):
        registry.get_policy_version(policy_name="p", policy_version_id="1")
    with pytest.raises(ResourceNotFoundException):
        registry.set_default_policy_version(policy_name="p", policy_version_id="9")


def test_delete_policy_preconditions_and_messages(registry: Registry) -> None:
    # spec broker §5.4, §7 item 20
    arn = _cert_arn(registry)
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    registry.attach_policy(policy_name="p", target=arn)
    message = raises_message(lambda: registry.delete_policy(policy_name="p"),
                             DeleteConflictException)
    assert message == ("The policy cannot be deleted as the policy is attached to one or more "
                       "principals (name=p)")
    registry.detach_policy(policy_name="p", target=arn)
    registry.create_policy_version(policy_name="p", policy_document=_doc("iot:Connect"))
    with pytest.raises(DeleteConflictException):
        registry.delete_policy(policy_name="p")
    registry.delete_policy_version(policy_name="p", policy_version_id="2")
    registry.delete_policy(policy_name="p")
    with pytest.raises(ResourceNotFoundException):
        registry.get_policy(policy_name="p")
    with pytest.raises(ResourceNotFoundException):
        registry.delete_policy(policy_name="p")


def test_attach_policy_to_a_certificate_is_limited_to_ten(registry: Registry) -> None:
    # spec broker §3.1: 10 policies per certificate → LimitExceededException
    arn = _cert_arn(registry)
    for n in range(10):
        registry.create_policy(policy_name=f"p{n}", policy_document=ALLOW_ALL)
        registry.attach_policy(policy_name=f"p{n}", target=arn)
    registry.attach_policy(policy_name="p0", target=arn)  # already attached: no-op
    registry.create_policy(policy_name="p10", policy_document=ALLOW_ALL)
    with pytest.raises(LimitExceededException):
        registry.attach_policy(policy_name="p10", target=arn)
    page = registry.list_attached_policies(target=arn, page_size=4)
    assert [p.policy_name for p in page.policies] == ["p0", "p1", "p2", "p3"]
    rest = registry.list_attached_policies(target=arn, marker=page.next_marker, page_size=250)
    assert len(rest.policies) == 6 and rest.next_marker is None


def test_thing_group_policy_limit_is_a_setting(tmp_path: Path) -> None:
    # spec broker §3.1 UNCONFIRMED current per-group limit
    reg = make_registry(tmp_path / "r.db",
                        settings=RegistrySettings(max_policies_per_thing_group=2))
    group = reg.create_thing_group(thing_group_name="g").thing_group_arn
    for n in range(3):
        reg.create_policy(policy_name=f"p{n}", policy_document=ALLOW_ALL)
    reg.attach_policy(policy_name="p0", target=group)
    reg.attach_policy(policy_name="p1", target=group)
    with pytest.raises(LimitExceededException):
        reg.attach_policy(policy_name="p2", target=group)
    reg.close()


def test_attach_policy_targets_must_exist(registry: Registry) -> None:
    # spec broker §5.4: unknown policy → ResourceNotFoundException
    arn = _cert_arn(registry)
    with pytest.raises(ResourceNotFoundException):
        registry.attach_policy(policy_name="missing", target=arn)
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    with pytest.raises(ResourceNotFoundException):
        registry.attach_policy(policy_name="p", target=registry.arn_prefix + "cert/" + "ab" * 32)
    with pytest.raises(ResourceNotFoundException):
        registry.attach_policy(policy_name="p", target=registry.arn_prefix + "thinggroup/none")
    with pytest.raises(InvalidRequestException):
        registry.attach_policy(policy_name="p", target="arn:aws:iot:eu-west-1:1:thing/x")
    cognito = "us-east-1:0a1b2c3d-0000-1111-2222-333344445555"
    registry.attach_policy(policy_name="p", target=cognito)
    assert registry.list_targets_for_policy(policy_name="p").targets == [cognito]


def test_detach_policy_is_idempotent(registry: Registry) -> None:
    # botocore models no ResourceNotFoundException for DetachPolicy
    events = EventLog()
    registry.add_listener(events)
    registry.detach_policy(policy_name="never", target=_cert_arn(registry))
    assert "policies_changed" not in events.kinds()


def test_list_attached_policies_recursive_includes_ancestor_groups(registry: Registry) -> None:
    # spec broker §3.4: group policies apply to child groups' things
    root = registry.create_thing_group(thing_group_name="root").thing_group_arn
    child = registry.create_thing_group(thing_group_name="child",
                                        parent_group_name="root").thing_group_arn
    for name, target in (("on-root", root), ("on-child", child)):
        registry.create_policy(policy_name=name, policy_document=ALLOW_ALL)
        registry.attach_policy(policy_name=name, target=target)
    direct = registry.list_attached_policies(target=child)
    assert [p.policy_name for p in direct.policies] == ["on-child"]
    recursive = registry.list_attached_policies(target=child, recursive=True)
    assert [p.policy_name for p in recursive.policies] == ["on-child", "on-root"]
    with pytest.raises(ResourceNotFoundException):
        registry.list_attached_policies(target=registry.arn_prefix + "thinggroup/none")


def test_list_targets_and_policies_page_with_markers(registry: Registry) -> None:
    # spec broker §5.1: marker/pageSize for policy lists; isAscendingOrder by creation
    for n in range(5):
        registry.create_policy(policy_name=f"p{n}", policy_document=ALLOW_ALL)
    first = registry.list_policies(page_size=3, ascending_order=True)
    second = registry.list_policies(page_size=3, ascending_order=True, marker=first.next_marker)
    assert [p.policy_name for p in first.policies + second.policies] == [
        "p0", "p1", "p2", "p3", "p4"]
    assert second.next_marker is None
    newest = registry.list_policies(page_size=1)
    assert newest.policies[0].policy_name == "p4"
    arns = [_cert_arn(registry) for _ in range(3)]
    for arn in arns:
        registry.attach_policy(policy_name="p0", target=arn)
    page = registry.list_targets_for_policy(policy_name="p0", page_size=2)
    tail = registry.list_targets_for_policy(policy_name="p0", marker=page.next_marker)
    assert page.targets + tail.targets == arns


def test_get_effective_policies_combines_certificate_and_thing_groups(registry: Registry) -> None:
    # spec broker §3.4, §5.3 GetEffectivePolicies
    arn = _cert_arn(registry)
    registry.create_thing(thing_name="t")
    registry.create_thing_group(thing_group_name="g")
    registry.add_thing_to_thing_group(thing_group_name="g", thing_name="t")
    for name, target, action in (("cert-p", arn, "iot:Connect"),
                                 ("group-p", registry.arn_prefix + "thinggroup/g", "iot:Publish")):
        registry.create_policy(policy_name=name, policy_document=_doc(action))
        registry.attach_policy(policy_name=name, target=target)
    result = registry.get_effective_policies(principal=arn, thing_name="t")
    assert [(p.policy_name, p.policy_document) for p in result.effective_policies] == [
        ("cert-p", _doc("iot:Connect")), ("group-p", _doc("iot:Publish"))]
    only_cert = registry.get_effective_policies(principal=arn)
    assert [p.policy_name for p in only_cert.effective_policies] == ["cert-p"]


def test_deprecated_principal_policy_operations_alias_the_modern_ones(registry: Registry
                                                                      ) -> None:
    # spec broker §5.3 (deprecated) AttachPrincipalPolicy / ListPrincipalPolicies /
    # ListPolicyPrincipals
    arn = _cert_arn(registry)
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    registry.attach_principal_policy(policy_name="p", principal=arn)
    assert [p.policy_name for p in registry.list_principal_policies(principal=arn).policies] == [
        "p"]
    assert registry.list_policy_principals(policy_name="p").principals == [arn]
    registry.detach_principal_policy(policy_name="p", principal=arn)
    assert registry.list_attached_policies(target=arn).policies == []
    with pytest.raises(ResourceNotFoundException):
        registry.detach_principal_policy(policy_name="missing", principal=arn)


def test_attachment_changes_fire_policies_changed_with_the_certificate(registry: Registry
                                                                       ) -> None:
    # the broker drops its per-connection authorization caches on these events
    arn = _cert_arn(registry)
    cert_id = arn.rsplit("/", 1)[1]
    registry.create_policy(policy_name="p", policy_document=ALLOW_ALL)
    events = EventLog()
    registry.add_listener(events)
    registry.attach_policy(policy_name="p", target=arn)
    registry.detach_policy(policy_name="p", target=arn)
    assert [(e.kind.value, e.certificate_id) for e in events.events] == [
        ("policies_changed", cert_id), ("policies_changed", cert_id)]
