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
import string
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
#: Normalised key names that are secret as a whole. (Not plain ``key``: AWS tags are
#: ``{"Key": ..., "Value": ...}`` and belong in reports.)
SECRET_KEY_NAMES: frozenset[str] = frozenset({"secret", "keypem", "authorization"})

_PEM_LABEL = r"-----(?:BEGIN|END) [A-Z0-9 ]*PRIVATE KEY-----"
_PEM_BLOCK = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.DOTALL
)
# A block whose END was cut off (truncated log): redact to the end of the text.
_PEM_HEAD = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*\Z", re.DOTALL)
# The END line of a block whose BEGIN was cut off; the base64 body before it is found by
# walking back (a regex anchored at every position would be quadratic on long logs).
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n")
# A secret-named key (matched by its ending, so ``nextToken`` and ``aws_secret_access_key``
# count) followed by ``:`` or ``=`` and its value: quoted, already masked, or a bare word.
# Candidates are found case-sensitively in an ASCII-lower-cased copy (6x faster on long
# logs than an IGNORECASE scan; the copy keeps every offset), then matched in the text.
_SECRET_WORDS = r"(?:token|private_?key|secret_?(?:access_?)?key|password|passphrase|claim_?key)"
_KEY_CANDIDATE = re.compile(_SECRET_WORDS)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_KEY_IN_TEXT = re.compile(
    rf"""(?P<key>{_SECRET_WORDS}["']?\s*[:=]\s*)"""
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
            text = _mask_orphan_ends(text)
    return _mask_keyed_values(text)


def _mask_keyed_values(text: str) -> str:
    """Mask the value after each secret-named key in ``key=value`` / ``"key": "value"`` text."""
    lowered = text.translate(_ASCII_LOWER)
    out: list[str] = []
    pos = 0
    for candidate in _KEY_CANDIDATE.finditer(lowered):
        if candidate.start() < pos:
            continue
        match = _KEY_IN_TEXT.match(text, candidate.start())
        if match is None:
            continue
        out += [text[pos:match.start()], _mask_value(match)]
        pos = match.end()
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def _mask_orphan_ends(text: str) -> str:
    """Mask each ``-----END ... PRIVATE KEY-----`` with the base64 lines before it."""
    out: list[str] = []
    pos = 0
    for match in _PEM_END.finditer(text):
        start = match.start()
        while start > pos:
            if start - 2 >= pos and text[start - 2:start] == "\\n":
                start -= 2
            elif text[start - 1] in _BASE64:
                start -= 1
            else:
                break
        out += [text[pos:start], PEM_MARKER]
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


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
