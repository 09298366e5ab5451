"""Output shapes of operations whose answer is not simply a stored record.

Each attribute is the snake_case of the output member it fills, so the control
plane serialises these generically. Records (:mod:`.records`) are returned as
they are wherever they already match the output shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.emulator.registry.records import (
    CaCertificate,
    Certificate,
    Policy,
    ProvisioningHook,
    ProvisioningTemplate,
    RegistrationConfig,
    TemplateType,
    Thing,
    ThingGroupProperties,
    ThingPrincipal,
    ThingType,
)

# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """AWS capitalises these members on the wire (``PublicKey``, ``PrivateKey``)."""

    public_key: str
    private_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class KeysAndCertificate:
    certificate_arn: str
    certificate_id: str
    certificate_pem: str
    key_pair: KeyPair


@dataclass(frozen=True, slots=True)
class RegistrationCode:
    registration_code: str


@dataclass(frozen=True, slots=True)
class DescribeCertificateResult:
    certificate_description: Certificate


@dataclass(frozen=True, slots=True)
class DescribeCaCertificateResult:
    certificate_description: CaCertificate
    registration_config: RegistrationConfig | None


@dataclass(frozen=True, slots=True)
class CertificatePage:
    certificates: list[Certificate]
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class CaCertificatePage:
    certificates: list[CaCertificate]
    next_marker: str | None = None


# -- policies ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreatePolicyResult:
    policy_name: str
    policy_arn: str
    policy_document: str
    policy_version_id: str


@dataclass(frozen=True, slots=True)
class PolicyDescription:
    policy_name: str
    policy_arn: str
    policy_document: str
    default_version_id: str
    creation_date: float
    last_modified_date: float
    generation_id: str


@dataclass(frozen=True, slots=True)
class PolicyPage:
    policies: list[Policy]
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class CreatePolicyVersionResult:
    policy_arn: str
    policy_document: str
    policy_version_id: str
    is_default_version: bool


@dataclass(frozen=True, slots=True)
class PolicyVersionDescription:
    policy_arn: str
    policy_name: str
    policy_document: str
    policy_version_id: str
    is_default_version: bool
    creation_date: float
    last_modified_date: float
    generation_id: str


@dataclass(frozen=True, slots=True)
class PolicyVersionSummary:
    version_id: str
    is_default_version: bool
    create_date: float


@dataclass(frozen=True, slots=True)
class PolicyVersionList:
    policy_versions: list[PolicyVersionSummary]


@dataclass(frozen=True, slots=True)
class TargetPage:
    targets: list[str]
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class PrincipalMarkerPage:
    principals: list[str]
    next_marker: str | None = None


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    policy_name: str
    policy_arn: str
    policy_document: str


@dataclass(frozen=True, slots=True)
class EffectivePolicies:
    effective_policies: list[EffectivePolicy]


# -- things ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThingPage:
    things: list[Thing]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class ThingNamePage:
    things: list[str]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class PrincipalPage:
    principals: list[str]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class ThingPrincipalPage:
    thing_principal_objects: list[ThingPrincipal]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class PrincipalThingPage:
    principal_thing_objects: list[ThingPrincipal]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class ThingTypePage:
    thing_types: list[ThingType]
    next_token: str | None = None


# -- groups ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupNameAndArn:
    group_name: str
    group_arn: str


@dataclass(frozen=True, slots=True)
class ThingGroupMetadata:
    parent_group_name: str | None
    root_to_parent_thing_groups: list[GroupNameAndArn]
    creation_date: float


@dataclass(frozen=True, slots=True)
class ThingGroupDescription:
    thing_group_name: str
    thing_group_id: str
    thing_group_arn: str
    version: int
    thing_group_properties: ThingGroupProperties
    thing_group_metadata: ThingGroupMetadata


@dataclass(frozen=True, slots=True)
class VersionResult:
    version: int


@dataclass(frozen=True, slots=True)
class ThingGroupPage:
    thing_groups: list[GroupNameAndArn]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class BillingGroupPage:
    billing_groups: list[GroupNameAndArn]
    next_token: str | None = None


# -- provisioning templates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateTemplateResult:
    template_arn: str
    template_name: str
    default_version_id: int


@dataclass(frozen=True, slots=True)
class TemplateDescription:
    """DescribeProvisioningTemplate: the template with its default version's body."""

    template_arn: str
    template_name: str
    description: str | None
    creation_date: float
    last_modified_date: float
    default_version_id: int
    template_body: str
    enabled: bool
    provisioning_role_arn: str
    pre_provisioning_hook: ProvisioningHook | None
    type: TemplateType


@dataclass(frozen=True, slots=True)
class TemplatePage:
    templates: list[ProvisioningTemplate]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class CreateTemplateVersionResult:
    template_arn: str
    template_name: str
    version_id: int
    is_default_version: bool


@dataclass(frozen=True, slots=True)
class TemplateVersionDescription:
    version_id: int
    creation_date: float
    template_body: str
    is_default_version: bool


@dataclass(frozen=True, slots=True)
class TemplateVersionPage:
    versions: list[TemplateVersionDescription]
    next_token: str | None = None
