"""IoT policies, their versions and their attachments (spec broker §3.1, §3.4, §5.3, §5.4)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from harness.emulator.registry.base import RegistryCore, TxView, read_op, tags_of, write_op
from harness.emulator.registry.events import RegistryEventKind
from harness.emulator.registry.paging import ordered, paginate
from harness.emulator.registry.records import Policy, PolicyTarget, PolicyVersion
from harness.emulator.registry.results import (
    CreatePolicyResult,
    CreatePolicyVersionResult,
    EffectivePolicies,
    EffectivePolicy,
    PolicyDescription,
    PolicyPage,
    PolicyVersionDescription,
    PolicyVersionList,
    PolicyVersionSummary,
    PrincipalMarkerPage,
    TargetPage,
)
from harness.emulator.registry.tables import View
from harness.errors import (
    AwsError,
    DeleteConflictException,
    InvalidRequestException,
    LimitExceededException,
    MalformedPolicyException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
    VersionsLimitExceededException,
)

#: Policy size limit, characters excluding white space (spec broker §3.1).
MAX_POLICY_CHARACTERS = 2048
#: A Cognito identity id (``<region>:<uuid>``), the third kind of policy target.
_COGNITO_ID = re.compile(r"[a-z]{2}(-[a-z]+)+-\d:[0-9a-fA-F-]+")


def check_policy_document(document: str) -> None:
    """The minimal check used when no policy parser is injected: a JSON object with a
    Statement, within the size limit."""
    if len("".join(document.split())) > MAX_POLICY_CHARACTERS:
        raise MalformedPolicyException(
            f"The policy document exceeds {MAX_POLICY_CHARACTERS} characters "
            "(white space excluded)")
    try:
        parsed = json.loads(document)
    except ValueError as exc:
        raise MalformedPolicyException("The policy document is not valid JSON") from exc
    if not isinstance(parsed, dict) or "Statement" not in parsed:
        raise MalformedPolicyException("The policy document must be a JSON object with a "
                                       "Statement")


class PoliciesMixin(RegistryCore):
    def _check_document(self, document: str) -> None:
        if self._policy_parser is None:
            check_policy_document(document)
            return
        try:
            self._policy_parser(document)
        except AwsError:
            raise
        except Exception as exc:
            raise MalformedPolicyException(str(exc)) from exc

    # -- policies and versions -----------------------------------------------------------------
    @write_op("CreatePolicy")
    def create_policy(self, view: TxView, *, policy_name: str, policy_document: str,
                      tags: Sequence[Mapping[str, Any]] | None = None) -> CreatePolicyResult:
        """Version ``1`` becomes the default (spec broker §3.1)."""
        arn = self.arn("policy", policy_name)
        if view.get(self._t.policies, policy_name) is not None:
            raise ResourceAlreadyExistsException(
                f"Policy cannot be created - name already exists (name={policy_name})",
                resourceId=policy_name, resourceArn=arn)
        self._check_document(policy_document)
        now = self._now()
        view.put(self._t.policies, Policy(
            policy_name=policy_name, policy_arn=arn, default_version_id="1", creation_date=now,
            last_modified_date=now, generation_id=self._new_id(),
            tags=tags_of(tags)))
        view.put(self._t.policy_versions, PolicyVersion(policy_name, "1", policy_document, now,
                                                        self._new_id()))
        return CreatePolicyResult(policy_name, arn, policy_document, "1")

    @read_op("GetPolicy")
    def get_policy(self, view: View, *, policy_name: str) -> PolicyDescription:
        policy = self._require_policy(view, policy_name)
        return PolicyDescription(
            policy_name=policy.policy_name, policy_arn=policy.policy_arn,
            policy_document=self._default_document(view, policy_name) or "",
            default_version_id=policy.default_version_id, creation_date=policy.creation_date,
            last_modified_date=policy.last_modified_date, generation_id=policy.generation_id)

    @write_op("DeletePolicy")
    def delete_policy(self, view: TxView, *, policy_name: str) -> None:
        """Refused while attached or while non-default versions exist (spec broker §5.4)."""
        policy = self._require_policy(view, policy_name)
        if view.keys_where(self._t.policy_targets, "policy", policy_name):
            raise DeleteConflictException(
                "The policy cannot be deleted as the policy is attached to one or more "
                f"principals (name={policy_name})")
        versions = view.keys_where(self._t.policy_versions, "policy", policy_name)
        if len(versions) > 1:
            raise DeleteConflictException(
                "The policy cannot be deleted as it has non-default versions; delete them "
                f"first (name={policy_name})")
        for key in versions:
            view.delete(self._t.policy_versions, key)
        view.delete(self._t.policies, policy.policy_name)

    @read_op("ListPolicies")
    def list_policies(self, view: View, *, marker: str | None = None,
                      page_size: int | None = None, ascending_order: bool | None = None
                      ) -> PolicyPage:
        table = self._t.policies
        keys, next_marker = paginate(view.ordered(table), marker,
                                     page_size or self.settings.default_page_size,
                                     descending=not ascending_order)
        return PolicyPage([p for k in keys if (p := view.get(table, k))], next_marker)

    @write_op("CreatePolicyVersion")
    def create_policy_version(self, view: TxView, *, policy_name: str, policy_document: str,
                              set_as_default: bool | None = None) -> CreatePolicyVersionResult:
        """At most five versions; ids are increasing decimal strings never reused."""
        policy = self._require_policy(view, policy_name)
        limit = self.settings.max_policy_versions
        if len(view.keys_where(self._t.policy_versions, "policy", policy_name)) >= limit:
            raise VersionsLimitExceededException(
                f"The policy {policy_name} already has the maximum number of versions ({limit})")
        self._check_document(policy_document)
        version_id = str(policy.next_version_id)
        now = self._now()
        view.put(self._t.policy_versions, PolicyVersion(policy_name, version_id, policy_document,
                                                        now, self._new_id()))
        view.put(self._t.policies, dataclasses.replace(
            policy, next_version_id=policy.next_version_id + 1, last_modified_date=now,
            default_version_id=version_id if set_as_default else policy.default_version_id))
        if set_as_default:
            view.emit(RegistryEventKind.POLICIES_CHANGED)
        return CreatePolicyVersionResult(policy.policy_arn, policy_document, version_id,
                                         bool(set_as_default))

    def _require_version(self, view: View, policy_name: str, version_id: str) -> PolicyVersion:
        return self._require(view, self._t.policy_versions, (policy_name, version_id),
                             f"Version {version_id} of policy {policy_name} does not exist.")

    @read_op("GetPolicyVersion")
    def get_policy_version(self, view: View, *, policy_name: str, policy_version_id: str
                           ) -> PolicyVersionDescription:
        policy = self._require_policy(view, policy_name)
        version = self._require_version(view, policy_name, policy_version_id)
        return PolicyVersionDescription(
            policy_arn=policy.policy_arn, policy_name=policy_name,
            policy_document=version.policy_document, policy_version_id=version.version_id,
            is_default_version=version.version_id == policy.default_version_id,
            creation_date=version.creation_date, last_modified_date=version.creation_date,
            generation_id=version.generation_id)

    @read_op("ListPolicyVersions")
    def list_policy_versions(self, view: View, *, policy_name: str) -> PolicyVersionList:
        """Newest version first; no paging (spec broker §5.3)."""
        policy = self._require_policy(view, policy_name)
        versions = view.where(self._t.policy_versions, "policy", policy_name)
        return PolicyVersionList([
            PolicyVersionSummary(v.version_id, v.version_id == policy.default_version_id,
                                 v.creation_date)
            for v in reversed(versions)])

    @write_op("SetDefaultPolicyVersion")
    def set_default_policy_version(self, view: TxView, *, policy_name: str,
                                   policy_version_id: str) -> None:
        """The new default is enforced at once (AWS: after its policy cache delay)."""
        policy = self._require_policy(view, policy_name)
        self._require_version(view, policy_name, policy_version_id)
        if policy.default_version_id == policy_version_id:
            return
        view.put(self._t.policies, dataclasses.replace(
            policy, default_version_id=policy_version_id, last_modified_date=self._now()))
        view.emit(RegistryEventKind.POLICIES_CHANGED)

    @write_op("DeletePolicyVersion")
    def delete_policy_version(self, view: TxView, *, policy_name: str,
                              policy_version_id: str) -> None:
        """UNCONFIRMED code (§5.4): the default version is refused with DeleteConflict."""
        policy = self._require_policy(view, policy_name)
        self._require_version(view, policy_name, policy_version_id)
        if policy.default_version_id == policy_version_id:
            raise DeleteConflictException(
                f"Cannot delete the default version of a policy (name={policy_name}, "
                f"version={policy_version_id})")
        view.delete(self._t.policy_versions, (policy_name, policy_version_id))

    # -- attachments ---------------------------------------------------------------------------
    def _resolve_target(self, view: View, target: str) -> str:
        """The canonical form of a certificate ARN, thing-group ARN or Cognito id, which
        must exist; anything else is refused."""
        cert_id = self._certificate_id_of(target)
        if cert_id is not None:
            return self._require_certificate(view, cert_id).certificate_arn
        group = self._group_name_of(target)
        if group is not None:
            if view.get(self._t.thing_groups, group) is None:
                raise ResourceNotFoundException(f"No thing group with ARN {target} exists")
            return target
        if _COGNITO_ID.fullmatch(target):
            return target
        raise InvalidRequestException(
            f"Invalid target {target}: expected a certificate ARN, a thing group ARN of this "
            "account or a Cognito identity id")

    def _canonical_target(self, target: str) -> str:
        cert_id = self._certificate_id_of(target)
        return self.arn("cert", cert_id) if cert_id is not None else target

    def _attach(self, view: TxView, policy_name: str, target: str) -> None:
        self._require_policy(view, policy_name)
        target = self._resolve_target(view, target)
        if view.get(self._t.policy_targets, (policy_name, target)) is not None:
            return
        cert_id = self._certificate_id_of(target)
        if cert_id is not None:
            limit, what = self.settings.max_policies_per_certificate, "certificate"
        elif self._group_name_of(target) is not None:
            limit, what = self.settings.max_policies_per_thing_group, "thing group"
        else:
            limit, what = 0, ""
        if limit and len(view.keys_where(self._t.policy_targets, "target", target)) >= limit:
            raise LimitExceededException(
                f"The maximum number of policies ({limit}) attached to a {what} has been "
                f"reached (arn: {target})")
        view.put(self._t.policy_targets, PolicyTarget(policy_name, target, self._now()))
        view.emit(RegistryEventKind.POLICIES_CHANGED, certificate_id=cert_id)

    def _detach(self, view: TxView, policy_name: str, target: str) -> None:
        target = self._canonical_target(target)
        if view.get(self._t.policy_targets, (policy_name, target)) is not None:
            view.delete(self._t.policy_targets, (policy_name, target))
            view.emit(RegistryEventKind.POLICIES_CHANGED,
                      certificate_id=self._certificate_id_of(target))

    @write_op("AttachPolicy")
    def attach_policy(self, view: TxView, *, policy_name: str, target: str) -> None:
        """Attach to a certificate ARN, thing-group ARN or Cognito id; 10 per certificate."""
        self._attach(view, policy_name, target)

    @write_op("DetachPolicy")
    def detach_policy(self, view: TxView, *, policy_name: str, target: str) -> None:
        """Idempotent: botocore models no ResourceNotFoundException for DetachPolicy."""
        self._detach(view, policy_name, target)

    @read_op("ListAttachedPolicies")
    def list_attached_policies(self, view: View, *, target: str, recursive: bool | None = None,
                               marker: str | None = None, page_size: int | None = None
                               ) -> PolicyPage:
        """Policies on ``target``; ``recursive`` on a thing group adds its ancestors' policies
        (on a certificate it changes nothing)."""
        target = self._resolve_target(view, target)
        targets = [target]
        group_name = self._group_name_of(target)
        if recursive and group_name is not None:
            group = self._require_group(view, group_name)
            targets += [g.thing_group_arn for g in self._ancestors(view, group)]
        names = dict.fromkeys(a.policy_name for t in targets
                              for a in view.where(self._t.policy_targets, "target", t))
        policies = [p for n in names if (p := view.get(self._t.policies, n))]
        page, next_marker = paginate(ordered(policies, lambda p: (p.policy_name,)), marker,
                                     page_size or self.settings.default_page_size)
        return PolicyPage(page, next_marker)

    @read_op("ListTargetsForPolicy")
    def list_targets_for_policy(self, view: View, *, policy_name: str, marker: str | None = None,
                                page_size: int | None = None) -> TargetPage:
        self._require_policy(view, policy_name)
        attachments = view.where(self._t.policy_targets, "policy", policy_name)
        page, next_marker = paginate(ordered(attachments, self._t.policy_targets.order), marker,
                                     page_size or self.settings.default_page_size)
        return TargetPage([a.target for a in page], next_marker)

    @read_op("GetEffectivePolicies")
    def get_effective_policies(self, view: View, *, principal: str | None = None,
                               cognito_identity_pool_id: str | None = None,
                               thing_name: str | None = None) -> EffectivePolicies:
        """The §3.4 policy set of ``principal`` (certificate ARN) and ``thing_name``."""
        cert_arn = None
        names: list[str] = []
        if principal is not None:
            target = self._resolve_target(view, principal)
            if self._certificate_id_of(target) is not None:
                cert_arn = target
            else:
                names = [a.policy_name for a in view.where(self._t.policy_targets, "target",
                                                           target)]
        if thing_name is not None:
            self._require_thing(view, thing_name)
        names = list(dict.fromkeys(
            [*names, *self._effective_policy_names(view, cert_arn, thing_name)]))
        out = []
        for name in names:
            policy = view.get(self._t.policies, name)
            document = self._default_document(view, name)
            if policy is not None and document is not None:
                out.append(EffectivePolicy(name, policy.policy_arn, document))
        return EffectivePolicies(out)

    # -- deprecated principal-policy operations ------------------------------------------------
    @write_op("AttachPrincipalPolicy")
    def attach_principal_policy(self, view: TxView, *, policy_name: str, principal: str) -> None:
        """Deprecated alias of AttachPolicy."""
        self._attach(view, policy_name, principal)

    @write_op("DetachPrincipalPolicy")
    def detach_principal_policy(self, view: TxView, *, policy_name: str, principal: str) -> None:
        """Deprecated alias of DetachPolicy (this one models ResourceNotFoundException)."""
        self._require_policy(view, policy_name)
        self._detach(view, policy_name, principal)

    @read_op("ListPrincipalPolicies")
    def list_principal_policies(self, view: View, *, principal: str, marker: str | None = None,
                                page_size: int | None = None,
                                ascending_order: bool | None = None) -> PolicyPage:
        target = self._resolve_target(view, principal)
        attachments = view.where(self._t.policy_targets, "target", target)
        page, next_marker = paginate(ordered(attachments, self._t.policy_targets.order), marker,
                                     page_size or self.settings.default_page_size,
                                     descending=not ascending_order)
        policies = [p for a in page if (p := view.get(self._t.policies, a.policy_name))]
        return PolicyPage(policies, next_marker)

    @read_op("ListPolicyPrincipals")
    def list_policy_principals(self, view: View, *, policy_name: str, marker: str | None = None,
                               page_size: int | None = None,
                               ascending_order: bool | None = None) -> PrincipalMarkerPage:
        self._require_policy(view, policy_name)
        attachments = view.where(self._t.policy_targets, "policy", policy_name)
        page, next_marker = paginate(ordered(attachments, self._t.policy_targets.order), marker,
                                     page_size or self.settings.default_page_size,
                                     descending=not ascending_order)
        return PrincipalMarkerPage([a.target for a in page], next_marker)
