"""Provisioning templates, their versions and CreateProvisioningClaim through boto3 against
a live emulator, with the AWS developer guide's template and hook (issue 4).

Spec: fleet-provisioning.md §2.1-§2.2 (CreateProvisioningClaim, the temporary claim),
§3.6 (types, versions, enabled flag), §3.7 (creation-time validation), §4 (hook
configuration), §6 and §6.1 (operations and shapes).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from harness import pki
from tests.cp_live_kit import (
    ARN_PREFIX,
    FLEET_TEMPLATE,
    HOOK_CONFIG,
    HOOK_TEMPLATE,
    ROLE_ARN,
    Live,
    assert_item_members,
    assert_members,
    aws_error,
    emulator_fixture,
    key_matches_certificate,
    paged_alike,
    unchanged,
    unique,
)

live = emulator_fixture()

GUIDE_HOOK = json.loads(HOOK_CONFIG.read_text())


def _create(iot: Any, name: str, **extra: Any) -> Any:
    return iot.create_provisioning_template(
        templateName=name, templateBody=HOOK_TEMPLATE.read_text(),
        provisioningRoleArn=ROLE_ARN, **extra)


def _describe(iot: Any, name: str) -> Any:
    return iot.describe_provisioning_template(templateName=name)


def test_the_guide_template_with_its_hook_is_created_as_aws_answers(live: Live) -> None:
    # spec fleet §6.1 (response templateArn, templateName, defaultVersionId 1), §4 hook,
    # §3.7 (the guide's undeclared SerialNumber is accepted at creation)
    iot = live.iot
    name = unique("guide")
    created = _create(iot, name, enabled=True, description="the guide's example",
                      preProvisioningHook=GUIDE_HOOK)
    assert_members(iot, "CreateProvisioningTemplate", created)
    assert {k: v for k, v in created.items() if k != "ResponseMetadata"} == {
        "templateArn": f"{ARN_PREFIX}provisioningtemplate/{name}", "templateName": name,
        "defaultVersionId": 1}
    described = _describe(iot, name)
    assert_members(iot, "DescribeProvisioningTemplate", described)
    assert described["templateBody"] == HOOK_TEMPLATE.read_text()
    assert described["preProvisioningHook"] == GUIDE_HOOK
    assert (described["enabled"], described["type"], described["defaultVersionId"],
            described["provisioningRoleArn"]) == (True, "FLEET_PROVISIONING", 1, ROLE_ARN)
    assert isinstance(described["creationDate"], dt.datetime)
    assert described["lastModifiedDate"] == described["creationDate"]


def test_a_template_is_disabled_unless_enabled_is_given(live: Live) -> None:
    # spec fleet §3.6: enabled defaults to false; type to FLEET_PROVISIONING
    iot = live.iot
    name = unique("plain")
    iot.create_provisioning_template(templateName=name, templateBody=FLEET_TEMPLATE.read_text(),
                                     provisioningRoleArn=ROLE_ARN)
    described = _describe(iot, name)
    assert_members(iot, "DescribeProvisioningTemplate", described,
                   absent=("description", "preProvisioningHook"))
    assert (described["enabled"], described["type"]) == (False, "FLEET_PROVISIONING")


def test_update_template_changes_settings_and_removes_the_hook(live: Live) -> None:
    # spec fleet §6.1 UpdateProvisioningTemplate; §4 removePreProvisioningHook
    iot = live.iot
    name = unique("upd")
    _create(iot, name, preProvisioningHook=GUIDE_HOOK)
    before = _describe(iot, name)
    other_role = f"arn:aws:iam::123456789012:role/{unique('role')}"
    assert iot.update_provisioning_template(
        templateName=name, description="now enabled", enabled=True,
        provisioningRoleArn=other_role)["ResponseMetadata"]["HTTPStatusCode"] == 200
    after = _describe(iot, name)
    assert (after["description"], after["enabled"], after["provisioningRoleArn"]) == (
        "now enabled", True, other_role)
    assert after["preProvisioningHook"] == GUIDE_HOOK
    assert after["lastModifiedDate"] > before["lastModifiedDate"]
    iot.update_provisioning_template(templateName=name, removePreProvisioningHook=True)
    assert "preProvisioningHook" not in _describe(iot, name)
    with unchanged(live, lambda: _describe(iot, name)), \
            aws_error(iot, "InvalidRequestException"):
        iot.update_provisioning_template(templateName=name, preProvisioningHook=GUIDE_HOOK,
                                         removePreProvisioningHook=True)


def test_list_provisioning_templates_pages_with_next_token(live: Live) -> None:
    # spec fleet §6 ListProvisioningTemplates (templates, nextToken/maxResults); §6.1 items
    iot = live.iot
    names = [unique("listed") for _ in range(3)]
    for name in names:
        _create(iot, name, description="listed")
    first = iot.list_provisioning_templates(maxResults=2)
    assert_members(iot, "ListProvisioningTemplates", first)
    assert len(first["templates"]) == 2
    pages = list(iot.get_paginator("list_provisioning_templates").paginate(
        PaginationConfig={"PageSize": 2}))
    templates = [t for page in pages for t in page["templates"]]
    mine = [t for t in templates if t["templateName"] in names]
    assert sorted(t["templateName"] for t in mine) == sorted(names)
    assert_item_members(iot, "ListProvisioningTemplates", mine, "templates")
    assert all(t["enabled"] is False and t["type"] == "FLEET_PROVISIONING" for t in mine)


def test_template_versions_are_numbered_switched_and_deleted(live: Live) -> None:
    # spec fleet §3.6: version 1 is the default; next ids 2, 3 (never reused);
    # setAsDefault; UpdateProvisioningTemplate moves defaultVersionId; the default version
    # cannot be deleted (UNCONFIRMED, DeleteConflictException); §6.1 shapes
    iot = live.iot
    name = unique("versions")
    _create(iot, name)
    second = iot.create_provisioning_template_version(templateName=name,
                                                      templateBody=FLEET_TEMPLATE.read_text())
    assert_members(iot, "CreateProvisioningTemplateVersion", second)
    assert (second["versionId"], second["isDefaultVersion"], second["templateName"]) == (
        2, False, name)
    third = iot.create_provisioning_template_version(
        templateName=name, templateBody=HOOK_TEMPLATE.read_text(), setAsDefault=True)
    assert (third["versionId"], third["isDefaultVersion"]) == (3, True)
    assert _describe(iot, name)["defaultVersionId"] == 3

    version = iot.describe_provisioning_template_version(templateName=name, versionId=2)
    assert_members(iot, "DescribeProvisioningTemplateVersion", version)
    assert (version["templateBody"], version["isDefaultVersion"]) == (
        FLEET_TEMPLATE.read_text(), False)
    listed = iot.list_provisioning_template_versions(templateName=name)
    assert_members(iot, "ListProvisioningTemplateVersions", listed, absent=("nextToken",))
    assert_item_members(iot, "ListProvisioningTemplateVersions", listed["versions"], "versions")
    assert [(v["versionId"], v["isDefaultVersion"]) for v in listed["versions"]] == [
        (1, False), (2, False), (3, True)]

    iot.update_provisioning_template(templateName=name, defaultVersionId=2)
    described = _describe(iot, name)
    assert (described["defaultVersionId"], described["templateBody"]) == (
        2, FLEET_TEMPLATE.read_text())
    with unchanged(live, lambda: iot.list_provisioning_template_versions(templateName=name)), \
            aws_error(iot, "DeleteConflictException", match="default version"):
        iot.delete_provisioning_template_version(templateName=name, versionId=2)
    assert iot.delete_provisioning_template_version(templateName=name, versionId=3)[
        "ResponseMetadata"]["HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException"):
        iot.describe_provisioning_template_version(templateName=name, versionId=3)
    fourth = iot.create_provisioning_template_version(templateName=name,
                                                      templateBody=HOOK_TEMPLATE.read_text())
    assert fourth["versionId"] == 4


def test_a_sixth_template_version_is_refused(live: Live) -> None:
    # spec fleet §3.6, §5: versions per template capped at 5 (UNCONFIRMED value,
    # RegistrySettings.max_template_versions) → VersionsLimitExceededException 409
    iot = live.iot
    name = unique("capped")
    _create(iot, name)
    for _ in range(4):
        iot.create_provisioning_template_version(templateName=name,
                                                 templateBody=FLEET_TEMPLATE.read_text())
    with unchanged(live, lambda: iot.list_provisioning_template_versions(templateName=name)), \
            aws_error(iot, "VersionsLimitExceededException"):
        iot.create_provisioning_template_version(templateName=name,
                                                 templateBody=FLEET_TEMPLATE.read_text())


def test_delete_template_removes_it_and_its_versions(live: Live) -> None:
    # spec fleet §6 DeleteProvisioningTemplate: empty answer; then ResourceNotFound
    iot = live.iot
    name = unique("deleted")
    _create(iot, name)
    iot.create_provisioning_template_version(templateName=name,
                                             templateBody=FLEET_TEMPLATE.read_text())
    assert iot.delete_provisioning_template(templateName=name)["ResponseMetadata"][
        "HTTPStatusCode"] == 200
    with aws_error(iot, "ResourceNotFoundException", match=name):
        _describe(iot, name)
    with aws_error(iot, "ResourceNotFoundException", match=name):
        iot.list_provisioning_template_versions(templateName=name)
    names = [t["templateName"] for page in iot.get_paginator(
        "list_provisioning_templates").paginate() for t in page["templates"]]
    assert name not in names


def test_a_hook_on_a_jitp_template_is_refused(live: Live) -> None:
    # spec fleet §3.6: a pre-provisioning hook only on FLEET_PROVISIONING templates
    iot = live.iot
    name = unique("jitp")
    with unchanged(live), aws_error(iot, "InvalidRequestException", match="FLEET_PROVISIONING"):
        _create(iot, name, type="JITP", preProvisioningHook=GUIDE_HOOK)
    _create(iot, name, type="JITP")
    assert _describe(iot, name)["type"] == "JITP"


def test_create_provisioning_claim_issues_a_five_minute_claim_outside_the_list(
        live: Live) -> None:
    # spec fleet §2.1 (response members, capitalised keyPair), §2.2 (valid 5 minutes,
    # not in ListCertificates); broker §2.1 certificate id rule
    iot = live.iot
    name = unique("trusted")
    _create(iot, name, enabled=True)
    issued_after = dt.datetime.now(dt.timezone.utc)
    claim = iot.create_provisioning_claim(templateName=name)
    assert_members(iot, "CreateProvisioningClaim", claim)
    assert set(claim["keyPair"]) == {"PublicKey", "PrivateKey"}
    assert claim["certificateId"] == pki.certificate_id(claim["certificatePem"])
    assert key_matches_certificate(claim["keyPair"]["PrivateKey"], claim["certificatePem"])
    lifetime = claim["expiration"] - issued_after
    assert dt.timedelta(minutes=4, seconds=50) <= lifetime <= dt.timedelta(minutes=5, seconds=10)
    listed = [c["certificateId"] for page in iot.get_paginator("list_certificates").paginate()
              for c in page["certificates"]]
    assert claim["certificateId"] not in listed
    second = iot.create_provisioning_claim(templateName=name)
    assert second["certificateId"] != claim["certificateId"]


def test_template_versions_page_one_item_at_a_time(live: Live) -> None:
    # spec fleet §6: ListProvisioningTemplateVersions pages with nextToken/maxResults
    iot = live.iot
    name = unique("pagedversions")
    _create(iot, name)
    for _ in range(3):
        iot.create_provisioning_template_version(templateName=name,
                                                 templateBody=FLEET_TEMPLATE.read_text())
    versions = paged_alike(iot, "list_provisioning_template_versions", templateName=name)
    assert [v["versionId"] for v in versions] == [1, 2, 3, 4]
