"""What the registry stores: states as enums, rows as frozen dataclasses.

Field names are the snake_case of AWS's output members, so a record can be
returned as an operation's output as it is (the control plane reads
``getattr(record, snake_name)`` for each member of the output shape); nested
output structures AWS computes from flat fields (``validity``,
``thingTypeMetadata``, ...) are properties. Timestamps are epoch seconds from the
registry's :class:`~harness.clock.Clock`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class CertificateStatus(str, Enum):
    """Device certificate states (spec broker §2.3); only ACTIVE may connect."""

    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"
    REVOKED = "REVOKED"
    PENDING_TRANSFER = "PENDING_TRANSFER"
    REGISTER_INACTIVE = "REGISTER_INACTIVE"
    PENDING_ACTIVATION = "PENDING_ACTIVATION"


class CertificateMode(str, Enum):
    """DEFAULT certificates are found by certificate alone; SNI_ONLY ones need SNI (§2.4)."""

    DEFAULT = "DEFAULT"
    SNI_ONLY = "SNI_ONLY"


class CaCertificateStatus(str, Enum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class AutoRegistrationStatus(str, Enum):
    ENABLE = "ENABLE"
    DISABLE = "DISABLE"


class ThingPrincipalType(str, Enum):
    """How a principal is attached to a thing (spec broker §3.4)."""

    EXCLUSIVE_THING = "EXCLUSIVE_THING"
    NON_EXCLUSIVE_THING = "NON_EXCLUSIVE_THING"


class TemplateType(str, Enum):
    """Provisioning template types (fleet-provisioning.md §3.6); fixed at creation."""

    FLEET_PROVISIONING = "FLEET_PROVISIONING"
    JITP = "JITP"


@dataclass(frozen=True, slots=True)
class Tag:
    key: str
    value: str | None = None


@dataclass(frozen=True, slots=True)
class CertificateValidity:
    not_before: float
    not_after: float


@dataclass(frozen=True, slots=True)
class Certificate:
    """A device certificate. ``owned_by_provisioning`` marks certificates issued by the
    fleet provisioning MQTT API (deleted when unused after the ownership token's hour)."""

    certificate_id: str
    certificate_arn: str
    certificate_pem: str
    status: CertificateStatus
    certificate_mode: CertificateMode
    ca_certificate_id: str | None
    owned_by: str
    creation_date: float
    last_modified_date: float
    not_before: float
    not_after: float
    customer_version: int = 1
    generation_id: str = ""
    owned_by_provisioning: bool = False

    @property
    def validity(self) -> CertificateValidity:
        return CertificateValidity(self.not_before, self.not_after)


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """JITP settings of a CA certificate (output shape ``RegistrationConfig``)."""

    template_body: str | None = None
    role_arn: str | None = None
    template_name: str | None = None


@dataclass(frozen=True, slots=True)
class CaCertificate:
    """A registered CA certificate; ``subject`` (RFC 4514) finds the CA of a device certificate."""

    certificate_id: str
    certificate_arn: str
    certificate_pem: str
    status: CaCertificateStatus
    auto_registration_status: AutoRegistrationStatus
    certificate_mode: CertificateMode
    subject: str
    owned_by: str
    creation_date: float
    last_modified_date: float
    not_before: float
    not_after: float
    registration_config: RegistrationConfig | None = None
    customer_version: int = 1
    generation_id: str = ""
    tags: tuple[Tag, ...] = ()

    @property
    def validity(self) -> CertificateValidity:
        return CertificateValidity(self.not_before, self.not_after)


@dataclass(frozen=True, slots=True)
class Policy:
    """An IoT policy; its documents live in :class:`PolicyVersion` rows."""

    policy_name: str
    policy_arn: str
    default_version_id: str
    creation_date: float
    last_modified_date: float
    generation_id: str
    next_version_id: int = 2
    tags: tuple[Tag, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    policy_name: str
    version_id: str
    policy_document: str
    creation_date: float
    generation_id: str = ""


@dataclass(frozen=True, slots=True)
class PolicyTarget:
    """One attachment of a policy to a certificate ARN, thing-group ARN or Cognito id."""

    policy_name: str
    target: str
    attached_at: float


@dataclass(frozen=True, slots=True)
class Thing:
    thing_name: str
    thing_id: str
    thing_arn: str
    thing_type_name: str | None
    attributes: Mapping[str, str]
    version: int
    billing_group_name: str | None
    creation_date: float

    @property
    def default_client_id(self) -> str:
        return self.thing_name


@dataclass(frozen=True, slots=True)
class ThingPrincipal:
    """A principal (certificate ARN or Cognito id) attached to a thing."""

    thing_name: str
    principal: str
    thing_principal_type: ThingPrincipalType
    attached_at: float


@dataclass(frozen=True, slots=True)
class ThingTypeProperties:
    thing_type_description: str | None
    searchable_attributes: tuple[str, ...]
    mqtt5_configuration: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ThingTypeMetadata:
    deprecated: bool
    deprecation_date: float | None
    creation_date: float


@dataclass(frozen=True, slots=True)
class ThingType:
    thing_type_name: str
    thing_type_id: str
    thing_type_arn: str
    description: str | None
    searchable_attributes: tuple[str, ...]
    mqtt5_configuration: Mapping[str, Any] | None
    deprecated: bool
    deprecation_date: float | None
    creation_date: float
    tags: tuple[Tag, ...] = ()

    @property
    def thing_type_properties(self) -> ThingTypeProperties:
        return ThingTypeProperties(self.description, self.searchable_attributes,
                                   self.mqtt5_configuration)

    @property
    def thing_type_metadata(self) -> ThingTypeMetadata:
        return ThingTypeMetadata(self.deprecated, self.deprecation_date, self.creation_date)


@dataclass(frozen=True, slots=True)
class AttributePayload:
    attributes: Mapping[str, str]
    merge: bool | None = None


@dataclass(frozen=True, slots=True)
class ThingGroupProperties:
    thing_group_description: str | None
    attribute_payload: AttributePayload


@dataclass(frozen=True, slots=True)
class ThingGroup:
    """A static thing group; ``parent_group_name`` links the hierarchy (depth ≤ 7)."""

    thing_group_name: str
    thing_group_id: str
    thing_group_arn: str
    parent_group_name: str | None
    description: str | None
    attributes: Mapping[str, str]
    version: int
    creation_date: float
    tags: tuple[Tag, ...] = ()

    @property
    def thing_group_properties(self) -> ThingGroupProperties:
        return ThingGroupProperties(self.description, AttributePayload(self.attributes))

    @property
    def group_name(self) -> str:
        return self.thing_group_name

    @property
    def group_arn(self) -> str:
        return self.thing_group_arn


@dataclass(frozen=True, slots=True)
class GroupMembership:
    thing_group_name: str
    thing_name: str
    added_at: float


@dataclass(frozen=True, slots=True)
class BillingGroupProperties:
    billing_group_description: str | None


@dataclass(frozen=True, slots=True)
class BillingGroupMetadata:
    creation_date: float


@dataclass(frozen=True, slots=True)
class BillingGroup:
    billing_group_name: str
    billing_group_id: str
    billing_group_arn: str
    description: str | None
    version: int
    creation_date: float
    tags: tuple[Tag, ...] = ()

    @property
    def billing_group_properties(self) -> BillingGroupProperties:
        return BillingGroupProperties(self.description)

    @property
    def billing_group_metadata(self) -> BillingGroupMetadata:
        return BillingGroupMetadata(self.creation_date)

    @property
    def group_name(self) -> str:
        return self.billing_group_name

    @property
    def group_arn(self) -> str:
        return self.billing_group_arn


@dataclass(frozen=True, slots=True)
class ProvisioningHook:
    target_arn: str
    payload_version: str | None = None


@dataclass(frozen=True, slots=True)
class ProvisioningTemplate:
    """A provisioning template; bodies live in :class:`TemplateVersion` rows."""

    template_name: str
    template_arn: str
    description: str | None
    enabled: bool
    provisioning_role_arn: str
    pre_provisioning_hook: ProvisioningHook | None
    type: TemplateType
    default_version_id: int
    creation_date: float
    last_modified_date: float
    next_version_id: int = 2
    tags: tuple[Tag, ...] = ()


@dataclass(frozen=True, slots=True)
class TemplateVersion:
    template_name: str
    version_id: int
    template_body: str
    creation_date: float


@dataclass(frozen=True, slots=True)
class Setting:
    """A per-account value (the CA registration code)."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """What the broker needs to authorize one connection (spec broker §3.4, §3.5).

    ``thing`` is the connection's thing: the thing attached to the certificate whose
    name equals the client id, or the exclusively attached thing. ``policy_documents``
    are the default versions of the policies attached to the certificate and to every
    static group of that thing and the groups' ancestors (``policy_names`` in the same
    order).
    """

    certificate: Certificate
    thing: Thing | None
    is_attached: bool
    exclusive: bool
    policy_documents: tuple[str, ...]
    policy_names: tuple[str, ...] = field(default=())
