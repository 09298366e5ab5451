"""A device's flash: the per-device credential store.

Firmware keeps its claim, its own key and certificate and its provisioning progress in
flash, so that a reboot reuses them and a power cut mid-flow can be recovered from
(issue 10). The virtual device does the same in one directory::

    claim.pem  claim.key       the claim it was given (key 0600)
    device.pem device.key      its own certificate and key once issued (key 0600)
    ownership.token            the certificateOwnershipToken until RegisterThing succeeds (0600)
    state.json                 progress: phase, certificate id, thing name (no secrets)

The token lives in its own 0600 file rather than in ``state.json`` so that the state
file can be attached to a report as it is. Every write is atomic (temp file + rename)
and ``state.json`` is written last: it is the commit point of each phase.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from harness import pki

CLAIM_CERT = "claim.pem"
CLAIM_KEY = "claim.key"
DEVICE_CERT = "device.pem"
DEVICE_KEY = "device.key"
TOKEN = "ownership.token"
STATE = "state.json"


class CredentialStoreError(Exception):
    """The store's content cannot be used (names the file, never its secret content)."""


class Phase(str, Enum):
    """How far provisioning got, as recorded in flash."""

    NEW = "new"  # nothing of its own yet
    CREDENTIALS_SAVED = "credentials_saved"  # key + certificate + token stored
    REGISTERED = "registered"  # RegisterThing accepted and recorded


@dataclass(frozen=True)
class DeviceState:
    """The content of ``state.json``."""

    phase: Phase = Phase.NEW
    certificate_id: str | None = None
    thing_name: str | None = None
    device_configuration: Mapping[str, str] = field(default_factory=dict)
    template_name: str | None = None
    token_issued_at: float | None = None
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))
        object.__setattr__(self, "device_configuration",
                           MappingProxyType(dict(self.device_configuration)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "certificate_id": self.certificate_id,
            "thing_name": self.thing_name,
            "device_configuration": dict(self.device_configuration),
            "template_name": self.template_name,
            "token_issued_at": self.token_issued_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceState:
        return cls(
            phase=Phase(data.get("phase", Phase.NEW.value)),
            certificate_id=data.get("certificate_id"),
            thing_name=data.get("thing_name"),
            device_configuration=dict(data.get("device_configuration") or {}),
            template_name=data.get("template_name"),
            token_issued_at=data.get("token_issued_at"),
            updated_at=float(data.get("updated_at") or 0.0),
        )


class CredentialStore:
    """One device's directory. Synchronous: called from the device's own thread, never
    from an event loop."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.directory)!r})"

    # -- paths -------------------------------------------------------------------------------
    @property
    def claim_cert(self) -> Path:
        return self.directory / CLAIM_CERT

    @property
    def claim_key(self) -> Path:
        return self.directory / CLAIM_KEY

    @property
    def device_cert(self) -> Path:
        return self.directory / DEVICE_CERT

    @property
    def device_key(self) -> Path:
        return self.directory / DEVICE_KEY

    @property
    def state_file(self) -> Path:
        return self.directory / STATE

    def ensure(self) -> None:
        """Create the directory (0700: it holds keys)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    # -- claim -------------------------------------------------------------------------------
    def install_claim(self, cert_path: Path, key_path: Path) -> None:
        """Copy the claim into flash unless the same claim is already there."""
        self.ensure()
        cert_pem = Path(cert_path).read_text()
        if self.claim_cert.exists() and self.claim_key.exists() \
                and self.claim_cert.read_text() == cert_pem:
            return
        pki.write_secret(self.claim_key, Path(key_path).read_text())
        pki.write_public(self.claim_cert, cert_pem)

    # -- device credentials ------------------------------------------------------------------
    def save_credentials(self, certificate_pem: str, private_key_pem: str, certificate_id: str,
                         token: str, template_name: str, now: float) -> DeviceState:
        """Store the new key, certificate and token, then commit phase CREDENTIALS_SAVED."""
        self.ensure()
        pki.write_secret(self.device_key, private_key_pem)
        pki.write_public(self.device_cert, certificate_pem)
        pki.write_secret(self.directory / TOKEN, token)
        return self.save_state(DeviceState(
            phase=Phase.CREDENTIALS_SAVED, certificate_id=certificate_id,
            template_name=template_name, token_issued_at=now, updated_at=now))

    def mark_registered(self, thing_name: str | None, device_configuration: Mapping[str, str],
                        now: float) -> DeviceState:
        """Commit phase REGISTERED and forget the token (it is spent)."""
        state = self.load_state()
        if state.phase is Phase.NEW:
            raise CredentialStoreError(f"{self.state_file}: no credentials to register")
        new = DeviceState(
            phase=Phase.REGISTERED, certificate_id=state.certificate_id, thing_name=thing_name,
            device_configuration=device_configuration, template_name=state.template_name,
            updated_at=now)
        self.save_state(new)
        (self.directory / TOKEN).unlink(missing_ok=True)
        return new

    def load_token(self) -> str | None:
        try:
            token = (self.directory / TOKEN).read_text().strip()
        except FileNotFoundError:
            return None
        return token or None

    def has_device_credentials(self) -> bool:
        return self.device_cert.exists() and self.device_key.exists()

    def device_certificate_pem(self) -> str:
        return self.device_cert.read_text()

    # -- state -------------------------------------------------------------------------------
    def load_state(self) -> DeviceState:
        """The recorded progress; ``NEW`` when nothing is recorded. A state that names
        credentials the directory lacks is reported, not trusted."""
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return DeviceState()
        except (OSError, ValueError) as exc:
            raise CredentialStoreError(f"{self.state_file}: unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise CredentialStoreError(f"{self.state_file}: expected a JSON object")
        try:
            state = DeviceState.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise CredentialStoreError(f"{self.state_file}: {exc}") from None
        if state.phase is not Phase.NEW and not self.has_device_credentials():
            raise CredentialStoreError(
                f"{self.state_file}: phase {state.phase.value} but {DEVICE_CERT}/{DEVICE_KEY} "
                "are missing")
        return state

    def save_state(self, state: DeviceState) -> DeviceState:
        self.ensure()
        pki.write_public(self.state_file, json.dumps(state.to_dict(), indent=2, sort_keys=True)
                         + "\n")
        return state

    def forget_progress(self) -> None:
        """Start over: drop the device's own credentials, token and state; keep the claim."""
        for name in (STATE, TOKEN, DEVICE_CERT, DEVICE_KEY):
            (self.directory / name).unlink(missing_ok=True)
