"""Limits and the registry's choices where the spec says UNCONFIRMED, as named settings.

Each default is the value the spec documents or recommends; the comment names the
spec section. Change them per emulator to mimic an account with raised quotas or to
try the other reading of an unconfirmed behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistrySettings:
    #: SQLite ``synchronous`` in WAL mode. FULL fsyncs the WAL on every commit: survives a
    #: power cut, costs one fsync per commit (0.4 ms on an idle disk, 3-5 ms measured on a
    #: busy shared one, so it caps a single writer at a few hundred commits per second).
    #: NORMAL survives a killed emulator (the WAL is in the OS page cache; the SIGKILL test
    #: checks it) but not a power cut: the choice for load runs.
    synchronous: str = "FULL"

    # spec broker §3.1
    max_policies_per_certificate: int = 10
    #: UNCONFIRMED: the 2022 doc allowed 2 per thing group; current value unknown.
    max_policies_per_thing_group: int = 10
    max_policy_versions: int = 5

    # spec broker §5.4
    max_attributes_without_type: int = 3
    max_attributes_with_type: int = 50
    max_thing_groups_per_thing: int = 10
    max_thing_group_depth: int = 7
    max_thing_group_children: int = 100
    #: A thing belongs to at most one group of each hierarchy.
    one_group_per_hierarchy: bool = True
    #: Seconds a thing type must stay deprecated before it can be deleted (2022 doc: 5 min).
    thing_type_delete_delay: float = 300.0
    #: UNCONFIRMED (§5.4): CreateThingType / CreateThingGroup / CreateBillingGroup with an
    #: existing name succeed when the configuration is identical, like CreateThing.
    idempotent_create: bool = True
    #: UNCONFIRMED (§5.4): deleting a thing group that has child groups is refused.
    refuse_delete_group_with_children: bool = True
    #: UNCONFIRMED (§5.4): adding a thing to a second billing group is refused (else moved).
    refuse_second_billing_group: bool = True

    # spec broker §2.3 / §2.4
    #: UNCONFIRMED: REVOKED → ACTIVE is refused with CertificateStateException.
    allow_revoked_to_active: bool = False
    #: UNCONFIRMED: DeleteCACertificate on an ACTIVE CA is refused with CertificateStateException.
    refuse_delete_active_ca: bool = True
    max_ca_certificates_per_subject: int = 10

    # fleet-provisioning.md §1.3 / §5
    #: UNCONFIRMED: CreateCertificateFromCsr copies the CSR's subject (else CN=AWS IoT Certificate).
    csr_subject_from_csr: bool = True
    #: UNCONFIRMED values of the template quotas (L-345B62A1, L-71FA7EC4).
    max_provisioning_templates: int = 256
    max_template_versions: int = 5

    # spec broker §5.1: page sizes when the caller gives none (UNCONFIRMED defaults).
    default_max_results: int = 50
    default_page_size: int = 25
