"""Certificate ownership tokens (spec fleet-provisioning.md §1.6).

CreateKeysAndCertificate and CreateCertificateFromCsr hand the device a token that
RegisterThing must present within one hour. AWS's token is opaque (observed: base64
of ``{"version":"20191023","cipher":"<base64 ciphertext>"}``, about 460 characters);
ours has the same outer shape, and the cipher is AES-256-GCM over the certificate
id, issue time, account and claim certificate, so a token can be neither read nor
forged nor altered, and the emulator keeps no table of them. The key lives in the
data directory with mode 0600, so tokens issued before a restart stay valid.

Whether a token was *used* is not recorded here: the provisioning service asks the
registry whether its certificate is still ``PENDING_ACTIVATION``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness import pki

#: Spec §1.6: RegisterThing must come within one hour of the certificate's creation.
TOKEN_LIFETIME_SECONDS = 3600.0
#: The ``version`` AWS's tokens carry (observed, S14).
TOKEN_VERSION = "20191023"
#: File in the data directory holding the token key (hex, mode 0600).
SECRET_FILE = "ownership-token.key"
#: Longer inputs are refused before any decoding (AWS's are ~460 characters).
MAX_TOKEN_CHARS = 4096

_NONCE_BYTES = 12
_KEY_BYTES = 32
_FILE_LOCK = threading.Lock()


class TokenProblem(str, Enum):
    """Why a token was refused; the value is the phrase the rejection carries."""

    MALFORMED = "malformed"
    UNKNOWN = "not issued by this endpoint"
    OTHER_ACCOUNT = "issued for another account"
    EXPIRED = "expired"


class TokenError(Exception):
    """A refused token. The message names the problem, never the token."""

    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


@dataclass(frozen=True)
class TokenContents:
    """What a valid token says. ``claim_certificate_id`` is the certificate of the
    connection that created the certificate (``None`` if not over MQTT)."""

    certificate_id: str
    issued_at: float
    account_id: str
    claim_certificate_id: str | None
    lifetime: float = TOKEN_LIFETIME_SECONDS

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.lifetime


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class TokenAuthority:
    """Issues and reads ownership tokens for one account."""

    def __init__(self, key: bytes, *, account_id: str,
                 lifetime: float = TOKEN_LIFETIME_SECONDS) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError("the token key must be 32 bytes")
        self._aead = AESGCM(key)
        self.account_id = account_id
        self.lifetime = lifetime

    @classmethod
    def ephemeral(cls, *, account_id: str,
                  lifetime: float = TOKEN_LIFETIME_SECONDS) -> TokenAuthority:
        """An authority whose tokens do not survive the process (no data directory)."""
        return cls(os.urandom(_KEY_BYTES), account_id=account_id, lifetime=lifetime)

    @classmethod
    def load_or_create(cls, directory: Path, *, account_id: str,
                       lifetime: float = TOKEN_LIFETIME_SECONDS) -> TokenAuthority:
        """Reuse ``directory/ownership-token.key`` or create it (mode 0600)."""
        path = Path(directory) / SECRET_FILE
        with _FILE_LOCK:
            if path.exists():
                try:
                    key = bytes.fromhex(path.read_text().strip())
                except ValueError:
                    raise ValueError(f"{path}: expected 64 hex characters") from None
            else:
                key = os.urandom(_KEY_BYTES)
                pki.write_secret(path, key.hex() + "\n")
        return cls(key, account_id=account_id, lifetime=lifetime)

    def issue(self, certificate_id: str, *, issued_at: float,
              claim_certificate_id: str | None = None) -> str:
        """A token for ``certificate_id`` issued at ``issued_at`` (emulated clock)."""
        plain = json.dumps(
            {"c": certificate_id, "t": issued_at, "a": self.account_id,
             "k": claim_certificate_id},
            separators=(",", ":"),
        ).encode()
        nonce = os.urandom(_NONCE_BYTES)
        cipher = self._aead.encrypt(nonce, plain, TOKEN_VERSION.encode())
        outer = json.dumps(
            {"version": TOKEN_VERSION, "cipher": base64.b64encode(nonce + cipher).decode()},
            separators=(",", ":"),
        )
        return base64.b64encode(outer.encode()).decode()

    def read(self, token: str, *, now: float) -> TokenContents:
        """The token's contents if it is valid at ``now``; else :class:`TokenError`."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise TokenError(TokenProblem.MALFORMED)
        try:
            outer = json.loads(_b64decode(token))
            if not isinstance(outer, dict) or outer.get("version") != TOKEN_VERSION:
                raise TokenError(TokenProblem.MALFORMED)
            blob = _b64decode(str(outer["cipher"]))
        except (ValueError, KeyError, binascii.Error, UnicodeError):
            raise TokenError(TokenProblem.MALFORMED) from None
        if len(blob) <= _NONCE_BYTES:
            raise TokenError(TokenProblem.MALFORMED)
        try:
            plain = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:],
                                       TOKEN_VERSION.encode())
        except InvalidTag:
            raise TokenError(TokenProblem.UNKNOWN) from None
        data = json.loads(plain)  # we wrote it: authenticated, well formed
        contents = TokenContents(
            certificate_id=str(data["c"]),
            issued_at=float(data["t"]),
            account_id=str(data["a"]),
            claim_certificate_id=data.get("k"),
            lifetime=self.lifetime,
        )
        if contents.account_id != self.account_id:
            raise TokenError(TokenProblem.OTHER_ACCOUNT)
        if now >= contents.expires_at:
            raise TokenError(TokenProblem.EXPIRED)
        return contents

