"""Strip secrets from anything a report writer is about to write.

Reports are read by people and kept by CI systems, so private keys (device
keys, claim keys, the ``keyPair.PrivateKey`` of a trusted-user claim) and
certificate ownership tokens must never reach them (spec fleet-provisioning
§1.2, §1.6, §2.2; style.md "Logging and secrets"). Every writer passes its
data through :func:`redact` (structures) or :func:`redact_text` (logs,
tracebacks). Both are idempotent, so redacting a report that was already
redacted changes nothing.

Three rules, applied together:

- a PEM private-key block (complete, or cut off at either end by truncation)
  becomes :data:`PEM_MARKER`;
- the value of a secret-named key (``certificateOwnershipToken``,
  ``privateKey``/``PrivateKey``, ``token``, ``*_secret_access_key``,
  ``password``...) becomes :data:`MARKER`, both in mappings and in text such
  as ``token=abc`` or ``"privateKey": "..."``;
- any caller-supplied secret string (a token the harness holds) becomes
  :data:`MARKER` wherever it occurs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MARKER = "[REDACTED]"
PEM_MARKER = "[REDACTED PRIVATE KEY]"

#: Normalised (lower-case, no ``_``/``-``) key-name endings whose values are secret.
SECRET_KEY_SUFFIXES: tuple[str, ...] = (
    "token",
    "privatekey",
    "secretkey",
    "secretaccesskey",
    "password",
    "passphrase",
    "claimkey",
)
#: Normalised key names that are secret as a whole.
SECRET_KEY_NAMES: frozenset[str] = frozenset({"key", "secret", "keypem", "authorization"})

_PEM_LABEL = r"-----(?:BEGIN|END) [A-Z0-9 ]*PRIVATE KEY-----"
_PEM_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.DOTALL
)
# A block whose END was cut off (truncated log): redact to the end of the text.
_PEM_HEAD = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*\Z", re.DOTALL)
# A block whose BEGIN was cut off: the base64 body (plain or with \n escapes) before an END.
_PEM_TAIL = re.compile(
    r"(?:[A-Za-z0-9+/=]+(?:\\n|\r?\n))*[A-Za-z0-9+/=]*-----END [A-Z0-9 ]*PRIVATE KEY-----"
)
_KEY_IN_TEXT = re.compile(
    r"""(?P<key>["']?\b[A-Za-z0-9_]*?(?:token|private_?key|secret_?(?:access_?)?key|password"""
    r"""|passphrase|claim_?key)["']?\s*[:=]\s*)"""
    r"""(?P<value>\[REDACTED(?: PRIVATE KEY)?\]"""
    r"""|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[^\s,;&}\])]+)""",
    re.IGNORECASE,
)


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a secret (matched case- and separator-insensitively)."""
    norm = name.lower().replace("_", "").replace("-", "")
    return norm in SECRET_KEY_NAMES or norm.endswith(SECRET_KEY_SUFFIXES)


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    quoted = value[:1] in "\"'" and len(value) >= 2
    return match.group("key") + (f"{value[0]}{MARKER}{value[0]}" if quoted else MARKER)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with private keys, secret-named values and the given ``secrets`` masked."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MARKER)
    if "PRIVATE KEY-----" in text:
        text = _PEM_BLOCK.sub(PEM_MARKER, text)
        text = _PEM_HEAD.sub(PEM_MARKER, text)
        if "-----END" in text:
            text = _PEM_TAIL.sub(PEM_MARKER, text)
    return _KEY_IN_TEXT.sub(_mask_value, text)


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like ``value`` with every secret masked.

    Mappings become dicts and sequences lists; a secret-named key keeps its
    key but its (non-empty) value becomes :data:`MARKER`.
    """
    known = tuple(secrets)
    return _redact(value, known)


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str) and is_secret_key(key) and item not in (None, "", {}, []):
                out[key] = MARKER if not isinstance(item, bool) else item
            else:
                out[key] = _redact(item, secrets)
        return out
    if isinstance(value, (list, tuple)):
        return [_redact(item, secrets) for item in value]
    return value


def contains_secret(text: str, secrets: Iterable[str] = ()) -> bool:
    """Whether ``text`` still shows a private-key label or one of ``secrets`` (a test aid)."""
    if re.search(_PEM_LABEL, text):
        return True
    return any(s and s in text for s in secrets)
