"""What the registry tells the broker and the provisioning service after each commit.

Listeners are called synchronously, in the committing (writer's) thread, after the
transaction is durable and memory is updated, in commit order. The broker hops onto
its loop with ``call_soon_threadsafe`` and drops what the event invalidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from harness.emulator.registry.records import CertificateStatus


class RegistryEventKind(str, Enum):
    """Values compare equal to the plain strings the broker matches on."""

    CERTIFICATE_STATUS = "certificate_status"
    """A certificate was created or changed status (``certificate_id``, ``status``)."""
    CERTIFICATE_DELETED = "certificate_deleted"
    POLICIES_CHANGED = "policies_changed"
    """A policy version, a policy attachment, a thing-principal attachment or a thing-group
    membership changed: per-connection authorization caches are stale."""
    THING_CHANGED = "thing_changed"
    """A thing was created, updated (attributes, type) or deleted (``thing_name``)."""
    TEMPLATE_CHANGED = "template_changed"
    TRUST_CHANGED = "trust_changed"
    """:meth:`Registry.trust_anchors_pem` changed: rebuild the TLS server context."""
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    kind: RegistryEventKind
    certificate_id: str | None = None
    thing_name: str | None = None
    status: CertificateStatus | None = None
    template_name: str | None = None
