"""The durable registry of the emulated AWS IoT account (spec broker §2, §3, §5).

``from harness.emulator.registry import Registry``. Layout: :mod:`.records`
(stored records and enums), :mod:`.results` (operation outputs), :mod:`.events`,
:mod:`.settings`, the operations by resource (:mod:`.certificates`,
:mod:`.policies`, :mod:`.things`, :mod:`.groups`, :mod:`.templates_store`), and the
machinery (:mod:`.base` transactions, :mod:`.tables` memory, :mod:`.store` SQLite,
:mod:`.codec`, :mod:`.paging`, :mod:`.validation`).
"""

from harness.emulator.registry.events import RegistryEvent, RegistryEventKind
from harness.emulator.registry.records import (
    AutoRegistrationStatus,
    BillingGroup,
    CaCertificate,
    CaCertificateStatus,
    Certificate,
    CertificateMode,
    CertificateStatus,
    ConnectionView,
    Policy,
    PolicyVersion,
    ProvisioningHook,
    ProvisioningTemplate,
    TemplateType,
    TemplateVersion,
    Thing,
    ThingGroup,
    ThingPrincipal,
    ThingPrincipalType,
    ThingType,
)
from harness.emulator.registry.registry import Registry
from harness.emulator.registry.settings import RegistrySettings

__all__ = [
    "AutoRegistrationStatus",
    "BillingGroup",
    "CaCertificate",
    "CaCertificateStatus",
    "Certificate",
    "CertificateMode",
    "CertificateStatus",
    "ConnectionView",
    "Policy",
    "PolicyVersion",
    "ProvisioningHook",
    "ProvisioningTemplate",
    "Registry",
    "RegistryEvent",
    "RegistryEventKind",
    "RegistrySettings",
    "TemplateType",
    "TemplateVersion",
    "Thing",
    "ThingGroup",
    "ThingPrincipal",
    "ThingPrincipalType",
    "ThingType",
]
