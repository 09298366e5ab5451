"""Apply an evaluated provisioning template to the registry (spec fleet-provisioning.md §1.4
step 7, §3.2, §3.3).

Runs on the registry writer thread (:mod:`harness.emulator.registry.writer`) inside the
caller's transaction (a savepoint of a group commit): every write joins it, so
RegisterThing either commits everything (thing, type, groups, billing group, policies,
attachments, certificate status) or nothing. What
the template references but does not create (thing type, thing groups, billing group,
named policies) must already exist; a missing one, an ``OverrideSettings`` ``FAIL``
conflict or a registry refusal becomes the ``rejected`` payload the device sees.

Emulator guesses (UNCONFIRMED in the spec), as named constants:

* :data:`STATUS_WITHOUT_CERTIFICATE_RESOURCE`: a template without an
  ``AWS::IoT::Certificate`` resource still activates the provisioned certificate and
  attaches it to the thing and the policies (it is the only certificate there is);
* an existing thing with any ``OverrideSettings`` value ``FAIL`` fails the request, as
  the spec's table reads ("error if thing exists");
* a property the template does not set is left alone whatever its override says;
  ``BillingGroup`` is replaced (spec: "assume REPLACE");
* an inline policy whose hash name already exists is reused as it is (the name is the
  hash of the document, so the content is the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from harness import protocol
from harness.emulator.registry import CertificateStatus, Registry
from harness.emulator.templates import Override, PolicyPlan, ProvisioningPlan, ThingPlan
from harness.errors import AwsError, ProvisioningError, ResourceNotFoundException

T = TypeVar("T")

#: Status of the provisioned certificate when the template has no certificate resource.
STATUS_WITHOUT_CERTIFICATE_RESOURCE = "ACTIVE"
#: Thing properties that have an ``OverrideSettings`` key (spec §3.3).
THING_OVERRIDE_PROPERTIES = ("AttributePayload", "ThingTypeName", "ThingGroups")


def refused(error: AwsError) -> ProvisioningError:
    """A registry refusal as the device sees it: 4xx → 400 template evaluation failure,
    anything else → 500."""
    if 400 <= error.status < 500:
        return protocol.template_evaluation_failed(error.message.rstrip("."))
    return protocol.internal_error()


def _exists(read: Callable[..., Any], **key: str) -> bool:
    """Whether the registry read ``read(**key)`` finds its resource."""
    try:
        read(**key)
    except ResourceNotFoundException:
        return False
    return True


def _all_pages(fetch: Callable[[str | None], tuple[list[T], str | None]]) -> list[T]:
    items: list[T] = []
    token: str | None = None
    while True:
        page, token = fetch(token)
        items.extend(page)
        if not token:
            return items


class PlanApplier:
    """Writes one :class:`ProvisioningPlan` for one certificate (inside a transaction)."""

    def __init__(self, registry: Registry, certificate_id: str, certificate_arn: str) -> None:
        self.registry = registry
        self.certificate_id = certificate_id
        self.certificate_arn = certificate_arn

    def apply(self, plan: ProvisioningPlan) -> None:
        """Everything the plan asks for; raises :class:`ProvisioningError` on refusal."""
        try:
            self._check_references(plan)
            if plan.thing is not None:
                self._thing(plan.thing)
            for policy in plan.policies:
                name = self._policy(policy)
                self.registry.attach_policy(policy_name=name, target=self.certificate_arn)
            status = (plan.certificate.status if plan.certificate is not None
                      else STATUS_WITHOUT_CERTIFICATE_RESOURCE)
            self.registry.update_certificate(certificate_id=self.certificate_id,
                                             new_status=CertificateStatus(status).value)
            if plan.thing is not None:
                self.registry.attach_thing_principal(thing_name=plan.thing.thing_name,
                                                     principal=self.certificate_arn)
        except AwsError as error:
            raise refused(error) from None

    # -- references (spec §3.2: referenced, not created; §3.7: checked at provision time) --------
    def _check_references(self, plan: ProvisioningPlan) -> None:
        reg = self.registry
        missing: list[str] = []
        thing = plan.thing
        if thing is not None:
            if thing.thing_type_name is not None and not _exists(
                    reg.describe_thing_type, thing_type_name=thing.thing_type_name):
                missing.append(f"thing type {thing.thing_type_name}")
            missing += [f"thing group {group}" for group in thing.thing_groups or ()
                        if not _exists(reg.describe_thing_group, thing_group_name=group)]
            if thing.billing_group is not None and not _exists(
                    reg.describe_billing_group, billing_group_name=thing.billing_group):
                missing.append(f"billing group {thing.billing_group}")
        missing += [f"policy {policy.policy_name}" for policy in plan.policies
                    if policy.policy_name is not None
                    and not _exists(reg.get_policy, policy_name=policy.policy_name)]
        if missing:
            verb = "does" if len(missing) == 1 else "do"
            raise protocol.template_evaluation_failed(f"{', '.join(missing)} {verb} not exist")

    # -- the thing (spec §3.3) ---------------------------------------------------------------
    def _thing(self, plan: ThingPlan) -> None:
        reg = self.registry
        name = plan.thing_name
        try:
            existing = reg.describe_thing(thing_name=name)
        except ResourceNotFoundException:
            existing = None
        if existing is None:
            reg.create_thing(
                thing_name=name,
                thing_type_name=plan.thing_type_name,
                attribute_payload=({"attributes": dict(plan.attributes)}
                                   if plan.attributes else None),
                billing_group_name=plan.billing_group,
            )
            for group in plan.thing_groups or ():
                reg.add_thing_to_thing_group(thing_group_name=group, thing_name=name)
            return
        overrides = {prop: plan.override_for(prop) for prop in THING_OVERRIDE_PROPERTIES}
        if Override.FAIL in overrides.values():
            raise protocol.resource_conflict("Thing", name)
        self._update_attributes_and_type(plan, overrides, existing.thing_type_name)
        self._update_groups(plan, overrides["ThingGroups"])
        if plan.billing_group is not None and existing.billing_group_name != plan.billing_group:
            if existing.billing_group_name is not None:
                reg.remove_thing_from_billing_group(
                    billing_group_name=existing.billing_group_name, thing_name=name)
            reg.add_thing_to_billing_group(billing_group_name=plan.billing_group,
                                           thing_name=name)

    def _update_attributes_and_type(self, plan: ThingPlan, overrides: dict[str, Override],
                                    current_type: str | None) -> None:
        changes: dict[str, Any] = {}
        attributes = overrides["AttributePayload"]
        if plan.attributes is not None and attributes in (Override.REPLACE, Override.MERGE):
            changes["attribute_payload"] = {"attributes": dict(plan.attributes),
                                            "merge": attributes is Override.MERGE}
        if (plan.thing_type_name is not None and overrides["ThingTypeName"] is Override.REPLACE
                and plan.thing_type_name != current_type):
            changes["thing_type_name"] = plan.thing_type_name
        if changes:
            self.registry.update_thing(thing_name=plan.thing_name, **changes)

    def _update_groups(self, plan: ThingPlan, override: Override) -> None:
        if plan.thing_groups is None or override is Override.DO_NOTHING:
            return
        reg = self.registry
        name = plan.thing_name
        current = {g.group_name for g in _all_pages(lambda token: _groups_page(reg, name, token))}
        wanted = set(plan.thing_groups)
        remove = sorted(current - wanted) if override is Override.REPLACE else []
        add = [g for g in plan.thing_groups if g not in current]
        if remove or add:
            reg.update_thing_groups_for_thing(thing_name=name, thing_groups_to_add=add,
                                              thing_groups_to_remove=remove)

    # -- policies (spec §3.2) ----------------------------------------------------------------
    def _policy(self, plan: PolicyPlan) -> str:
        """The policy's name, creating an inline one the first time its document is seen."""
        name = plan.resolved_name()
        if plan.policy_document is not None and not _exists(self.registry.get_policy,
                                                            policy_name=name):
            self.registry.create_policy(policy_name=name, policy_document=plan.policy_document)
        return name


def _groups_page(reg: Registry, thing_name: str, token: str | None) -> tuple[list[Any], str | None]:
    page = reg.list_thing_groups_for_thing(thing_name=thing_name, next_token=token)
    return list(page.thing_groups), page.next_token
