"""Provisioning templates and their versions (fleet-provisioning.md §3.6, §6).

Only storage and control-plane semantics: evaluating a template is
:mod:`harness.emulator.templates`' job; its creation-time validator is injected.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from harness.emulator.registry.base import RegistryCore, TxView, read_op, tags_of, write_op
from harness.emulator.registry.events import RegistryEventKind
from harness.emulator.registry.paging import ordered, paginate
from harness.emulator.registry.records import (
    ProvisioningHook,
    ProvisioningTemplate,
    TemplateType,
    TemplateVersion,
)
from harness.emulator.registry.results import (
    CreateTemplateResult,
    CreateTemplateVersionResult,
    TemplateDescription,
    TemplatePage,
    TemplateVersionDescription,
    TemplateVersionPage,
)
from harness.emulator.registry.tables import View
from harness.errors import (
    AwsError,
    DeleteConflictException,
    InvalidRequestException,
    LimitExceededException,
    ResourceAlreadyExistsException,
    VersionsLimitExceededException,
)


def check_template_body(body: str) -> None:
    """The minimal check used when no template validator is injected: a JSON object."""
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestException("The template body is not valid JSON") from exc
    if not isinstance(parsed, dict):
        raise InvalidRequestException("The template body must be a JSON object")


def _hook(hook: Mapping[str, Any] | None) -> ProvisioningHook | None:
    if hook is None:
        return None
    return ProvisioningHook(target_arn=hook["targetArn"],
                            payload_version=hook.get("payloadVersion"))


class TemplatesMixin(RegistryCore):
    def _check_body(self, body: str) -> None:
        if self._template_validator is None:
            check_template_body(body)
            return
        try:
            self._template_validator(body)
        except AwsError:
            raise
        except Exception as exc:
            raise InvalidRequestException(str(exc)) from exc

    def _require_template(self, view: View, template_name: str) -> ProvisioningTemplate:
        return self._require(view, self._t.templates, template_name,
                             f"The provisioning template {template_name} does not exist")

    def _require_template_version(self, view: View, template: ProvisioningTemplate,
                                  version_id: int) -> TemplateVersion:
        name = template.template_name
        return self._require(view, self._t.template_versions, (name, version_id),
                             f"Version {version_id} of provisioning template {name} does not "
                             "exist")

    @staticmethod
    def _check_hook(kind: TemplateType, hook: Mapping[str, Any] | None) -> None:
        if hook is not None and kind is not TemplateType.FLEET_PROVISIONING:
            raise InvalidRequestException(
                "A pre-provisioning hook is only supported on FLEET_PROVISIONING templates")

    @write_op("CreateProvisioningTemplate")
    def create_provisioning_template(
        self, view: TxView, *, template_name: str, template_body: str, provisioning_role_arn: str,
        description: str | None = None, enabled: bool | None = None,
        pre_provisioning_hook: Mapping[str, Any] | None = None,
        tags: Sequence[Mapping[str, Any]] | None = None, type: str | None = None,
    ) -> CreateTemplateResult:
        """Version 1 becomes the default; ``enabled`` defaults to false and ``type`` to
        FLEET_PROVISIONING (§3.6)."""
        kind = TemplateType(type or TemplateType.FLEET_PROVISIONING)
        self._check_hook(kind, pre_provisioning_hook)
        arn = self.arn("provisioningtemplate", template_name)
        if view.get(self._t.templates, template_name) is not None:
            raise ResourceAlreadyExistsException(
                f"Template with name {template_name} already exists",
                resourceId=template_name, resourceArn=arn)
        limit = self.settings.max_provisioning_templates
        if view.count(self._t.templates) >= limit:
            raise LimitExceededException(
                f"The account already has the maximum number of provisioning templates ({limit})")
        self._check_body(template_body)
        now = self._now()
        view.put(self._t.templates, ProvisioningTemplate(
            template_name=template_name, template_arn=arn, description=description,
            enabled=bool(enabled), provisioning_role_arn=provisioning_role_arn,
            pre_provisioning_hook=_hook(pre_provisioning_hook), type=kind, default_version_id=1,
            creation_date=now, last_modified_date=now, tags=tags_of(tags)))
        view.put(self._t.template_versions, TemplateVersion(template_name, 1, template_body, now))
        view.emit(RegistryEventKind.TEMPLATE_CHANGED, template_name=template_name)
        return CreateTemplateResult(arn, template_name, 1)

    @read_op("DescribeProvisioningTemplate")
    def describe_provisioning_template(self, view: View, *, template_name: str
                                       ) -> TemplateDescription:
        """The template with its **default** version's body (what RegisterThing evaluates)."""
        template = self._require_template(view, template_name)
        body = self._require_template_version(view, template, template.default_version_id)
        return TemplateDescription(
            template_arn=template.template_arn, template_name=template.template_name,
            description=template.description, creation_date=template.creation_date,
            last_modified_date=template.last_modified_date,
            default_version_id=template.default_version_id, template_body=body.template_body,
            enabled=template.enabled, provisioning_role_arn=template.provisioning_role_arn,
            pre_provisioning_hook=template.pre_provisioning_hook, type=template.type)

    @write_op("UpdateProvisioningTemplate")
    def update_provisioning_template(
        self, view: TxView, *, template_name: str, description: str | None = None,
        enabled: bool | None = None, default_version_id: int | None = None,
        provisioning_role_arn: str | None = None,
        pre_provisioning_hook: Mapping[str, Any] | None = None,
        remove_pre_provisioning_hook: bool | None = None,
    ) -> None:
        """The body changes only through versions; ``default_version_id`` moves the default."""
        template = self._require_template(view, template_name)
        if pre_provisioning_hook is not None and remove_pre_provisioning_hook:
            raise InvalidRequestException(
                "preProvisioningHook and removePreProvisioningHook cannot both be given")
        self._check_hook(template.type, pre_provisioning_hook)
        if default_version_id is not None:
            self._require_template_version(view, template, default_version_id)
        hook = template.pre_provisioning_hook
        if remove_pre_provisioning_hook:
            hook = None
        elif pre_provisioning_hook is not None:
            hook = _hook(pre_provisioning_hook)
        view.put(self._t.templates, dataclasses.replace(
            template,
            description=template.description if description is None else description,
            enabled=template.enabled if enabled is None else enabled,
            default_version_id=(template.default_version_id if default_version_id is None
                                else default_version_id),
            provisioning_role_arn=provisioning_role_arn or template.provisioning_role_arn,
            pre_provisioning_hook=hook, last_modified_date=self._now()))
        view.emit(RegistryEventKind.TEMPLATE_CHANGED, template_name=template_name)

    @write_op("DeleteProvisioningTemplate")
    def delete_provisioning_template(self, view: TxView, *, template_name: str) -> None:
        self._require_template(view, template_name)
        for key in view.keys_where(self._t.template_versions, "template", template_name):
            view.delete(self._t.template_versions, key)
        view.delete(self._t.templates, template_name)
        view.emit(RegistryEventKind.TEMPLATE_CHANGED, template_name=template_name)

    @read_op("ListProvisioningTemplates")
    def list_provisioning_templates(self, view: View, *, max_results: int | None = None,
                                    next_token: str | None = None) -> TemplatePage:
        names, token = paginate(view.ordered(self._t.templates), next_token,
                                max_results or self.settings.default_max_results)
        return TemplatePage([self._require_template(view, n) for n in names], token)

    @write_op("CreateProvisioningTemplateVersion")
    def create_provisioning_template_version(self, view: TxView, *, template_name: str,
                                             template_body: str,
                                             set_as_default: bool | None = None
                                             ) -> CreateTemplateVersionResult:
        """Next integer id (never reused); at most ``max_template_versions`` versions."""
        template = self._require_template(view, template_name)
        limit = self.settings.max_template_versions
        if len(view.keys_where(self._t.template_versions, "template", template_name)) >= limit:
            raise VersionsLimitExceededException(
                f"The provisioning template {template_name} already has the maximum number of "
                f"versions ({limit})")
        self._check_body(template_body)
        version_id = template.next_version_id
        now = self._now()
        view.put(self._t.template_versions,
                 TemplateVersion(template_name, version_id, template_body, now))
        view.put(self._t.templates, dataclasses.replace(
            template, next_version_id=version_id + 1, last_modified_date=now,
            default_version_id=version_id if set_as_default else template.default_version_id))
        view.emit(RegistryEventKind.TEMPLATE_CHANGED, template_name=template_name)
        return CreateTemplateVersionResult(template.template_arn, template_name, version_id,
                                           bool(set_as_default))

    def _version_description(self, template: ProvisioningTemplate, version: TemplateVersion
                             ) -> TemplateVersionDescription:
        return TemplateVersionDescription(
            version_id=version.version_id, creation_date=version.creation_date,
            template_body=version.template_body,
            is_default_version=version.version_id == template.default_version_id)

    @read_op("DescribeProvisioningTemplateVersion")
    def describe_provisioning_template_version(self, view: View, *, template_name: str,
                                               version_id: int) -> TemplateVersionDescription:
        template = self._require_template(view, template_name)
        version = self._require_template_version(view, template, version_id)
        return self._version_description(template, version)

    @read_op("ListProvisioningTemplateVersions")
    def list_provisioning_template_versions(self, view: View, *, template_name: str,
                                            max_results: int | None = None,
                                            next_token: str | None = None
                                            ) -> TemplateVersionPage:
        template = self._require_template(view, template_name)
        versions = view.where(self._t.template_versions, "template", template_name)
        page, token = paginate(ordered(versions, lambda v: (v.version_id,)), next_token,
                               max_results or self.settings.default_max_results)
        return TemplateVersionPage([self._version_description(template, v) for v in page], token)

    @write_op("DeleteProvisioningTemplateVersion")
    def delete_provisioning_template_version(self, view: TxView, *, template_name: str,
                                             version_id: int) -> None:
        """UNCONFIRMED (§3.6): the default version is refused with DeleteConflictException."""
        template = self._require_template(view, template_name)
        self._require_template_version(view, template, version_id)
        if version_id == template.default_version_id:
            raise DeleteConflictException(
                f"Version {version_id} is the default version of provisioning template "
                f"{template_name} and cannot be deleted")
        view.delete(self._t.template_versions, (template_name, version_id))
        view.emit(RegistryEventKind.TEMPLATE_CHANGED, template_name=template_name)
