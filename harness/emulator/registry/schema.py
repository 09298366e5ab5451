"""The registry's tables: keys, listing orders and the indexes reads need."""

from __future__ import annotations

from harness.emulator.registry.records import (
    BillingGroup,
    CaCertificate,
    Certificate,
    GroupMembership,
    Policy,
    PolicyTarget,
    PolicyVersion,
    ProvisioningTemplate,
    Setting,
    TemplateVersion,
    Thing,
    ThingGroup,
    ThingPrincipal,
    ThingType,
)
from harness.emulator.registry.tables import Table


class Tables:
    """Every table, typed; :meth:`all` in a fixed order for the store."""

    def __init__(self) -> None:
        self.certificates = Table(
            "certificates", Certificate, lambda c: c.certificate_id,
            indexes={"ca": lambda c: [c.ca_certificate_id] if c.ca_certificate_id else [],
                     "mode": lambda c: [c.certificate_mode]},
            order=lambda c: (c.creation_date, c.certificate_id))
        self.ca_certificates = Table(
            "ca_certificates", CaCertificate, lambda c: c.certificate_id,
            indexes={"subject": lambda c: [c.subject]},
            order=lambda c: (c.creation_date, c.certificate_id))
        self.policies = Table(
            "policies", Policy, lambda p: p.policy_name,
            order=lambda p: (p.creation_date, p.policy_name))
        self.policy_versions = Table(
            "policy_versions", PolicyVersion, lambda v: (v.policy_name, v.version_id),
            indexes={"policy": lambda v: [v.policy_name]},
            order=lambda v: (v.policy_name, int(v.version_id)))
        self.policy_targets = Table(
            "policy_targets", PolicyTarget, lambda a: (a.policy_name, a.target),
            indexes={"policy": lambda a: [a.policy_name], "target": lambda a: [a.target]},
            order=lambda a: (a.attached_at, a.policy_name, a.target))
        self.things = Table(
            "things", Thing, lambda t: t.thing_name,
            indexes={"type": lambda t: [t.thing_type_name] if t.thing_type_name else [],
                     "billing_group": lambda t: (
                         [t.billing_group_name] if t.billing_group_name else [])})
        self.thing_principals = Table(
            "thing_principals", ThingPrincipal, lambda a: (a.thing_name, a.principal),
            indexes={"thing": lambda a: [a.thing_name], "principal": lambda a: [a.principal]})
        self.thing_types = Table("thing_types", ThingType, lambda t: t.thing_type_name)
        self.thing_groups = Table(
            "thing_groups", ThingGroup, lambda g: g.thing_group_name,
            indexes={"parent": lambda g: [g.parent_group_name] if g.parent_group_name else []})
        self.group_members = Table(
            "group_members", GroupMembership, lambda m: (m.thing_group_name, m.thing_name),
            indexes={"group": lambda m: [m.thing_group_name], "thing": lambda m: [m.thing_name]})
        self.billing_groups = Table("billing_groups", BillingGroup, lambda g: g.billing_group_name)
        self.templates = Table("templates", ProvisioningTemplate, lambda t: t.template_name)
        self.template_versions = Table(
            "template_versions", TemplateVersion, lambda v: (v.template_name, v.version_id),
            indexes={"template": lambda v: [v.template_name]})
        self.settings = Table("settings", Setting, lambda s: s.name)

    def all(self) -> list[Table]:  # type: ignore[type-arg]
        return [self.certificates, self.ca_certificates, self.policies, self.policy_versions,
                self.policy_targets, self.things, self.thing_principals, self.thing_types,
                self.thing_groups, self.group_members, self.billing_groups, self.templates,
                self.template_versions, self.settings]
