"""Policy variables and condition keys of one connection (spec iot-broker-and-policy.md §3.5).

A connection's context is fixed from CONNECT on, so :class:`PolicyVariables` resolves every
value once (certificate fields lazily, on first use) and the policy engine substitutes them
into resources and conditions when it builds a connection's authorizer.

Two lookups exist because AWS treats them differently:

- :meth:`PolicyVariables.substitution` gives the text for ``${name}`` in a resource or a
  condition value. It refuses (returns ``None``) multi-valued keys and values that AWS does not
  substitute (longer than 1024 characters, or containing ``* $ + ? #``).
- :meth:`PolicyVariables.values` gives the context values a ``Condition`` key is compared with;
  multi-valued keys (``.List``, ``iot:ConnectAttributes``, ``iot:Certificate.AvailableKeys``)
  return all their values.

Names are matched case-insensitively as in IAM, except a thing attribute's name inside
``Attributes[...]``, which is case-sensitive like the registry's attribute names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from cryptography import x509
from cryptography.x509.oid import NameOID

from harness import pki

#: Values longer than this are not substituted (cert-policy-variables page, "String length").
MAX_SUBSTITUTED_LENGTH = 1024
#: Values containing any of these are not substituted (cert-policy-variables page, "Wildcards").
NOT_SUBSTITUTED_CHARACTERS = frozenset("*$+?#")
#: Multi-valued certificate attributes keep only their first five values ("Array fields").
MAX_ARRAY_ITEMS = 5
#: DN characters AWS expects backslash-escaped in policies ("Special Characters").
DN_SPECIAL_CHARACTERS = frozenset(',"\\+=<>;')

#: Values of ``iot:ConnectAttributes`` (spec §3.5).
CONNECT_ATTRIBUTE_PERSISTENT = "PersistentConnect"
CONNECT_ATTRIBUTE_LAST_WILL = "LastWill"

# Distinguished-name fields AWS exposes, canonical spelling -> OID (cert-policy-variables page).
_DN_FIELDS: dict[str, x509.ObjectIdentifier] = {
    "CommonName": NameOID.COMMON_NAME,
    "Organization": NameOID.ORGANIZATION_NAME,
    "OrganizationalUnit": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "Country": NameOID.COUNTRY_NAME,
    "State": NameOID.STATE_OR_PROVINCE_NAME,
    "SerialNumber": NameOID.SERIAL_NUMBER,
    "Title": NameOID.TITLE,
    "Surname": NameOID.SURNAME,
    "GivenName": NameOID.GIVEN_NAME,
    "Initials": NameOID.INITIALS,
    "Pseudonym": NameOID.PSEUDONYM,
    "GenerationQualifier": NameOID.GENERATION_QUALIFIER,
    "DistinguishedNameQualifier": NameOID.DN_QUALIFIER,
}
# Alternative-name kinds AWS exposes, canonical spelling -> general-name class.
_ALT_NAME_KINDS: dict[str, type[x509.GeneralName]] = {
    "RFC822Name": x509.RFC822Name,
    "DNSName": x509.DNSName,
    "DirectoryName": x509.DirectoryName,
    "UniformResourceIdentifier": x509.UniformResourceIdentifier,
    "IPAddress": x509.IPAddress,
}
_SCOPES = {"subject": "Subject", "issuer": "Issuer"}

_ATTRIBUTE_KEY = re.compile(r"iot:connection\.thing\.attributes\[(.*)\]", re.IGNORECASE | re.DOTALL)
_CERT_KEY = re.compile(
    r"iot:certificate\.(subject|issuer)\.(?:(alternativename)\.)?([a-z0-9]+)(?:\.(\d+|list))?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ConnectionContext:
    """Everything about a connection that policy variables and condition keys can refer to.

    The broker fills ``thing_name`` (and type, attributes) only when the connection has a thing
    under spec §3.4 (client id = name of a thing attached to the certificate, or the thing
    exclusively attached to it); ``is_attached`` is the value of
    ``iot:Connection.Thing.IsAttached``. ``connect_attributes`` is ``iot:ConnectAttributes``:
    a subset of {"PersistentConnect", "LastWill"}.
    """

    region: str
    account_id: str
    client_id: str
    certificate: x509.Certificate | None
    certificate_id: str | None = None
    thing_name: str | None = None
    thing_type_name: str | None = None
    thing_attributes: Mapping[str, str] = field(default_factory=dict)
    is_attached: bool = False
    source_ip: str | None = None
    domain_name: str | None = None
    connect_attributes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Attribute:
    """A certificate attribute's values (at most five) and whether they are DN text."""

    values: tuple[str, ...]
    dn: bool


def escape_dn_value(value: str) -> str:
    """Backslash-escape the DN special characters, as AWS expects them written in a policy."""
    if not DN_SPECIAL_CHARACTERS.intersection(value):
        return value
    return "".join("\\" + c if c in DN_SPECIAL_CHARACTERS else c for c in value)


def substitutable(value: str) -> bool:
    """Whether AWS substitutes ``value`` for a ``${...}`` variable (§3.5 resolution rules)."""
    if len(value) > MAX_SUBSTITUTED_LENGTH:
        return False
    return not NOT_SUBSTITUTED_CHARACTERS.intersection(value)


class PolicyVariables:
    """Resolves policy variables and condition keys against one fixed :class:`ConnectionContext`."""

    def __init__(self, context: ConnectionContext) -> None:
        self.context = context
        ctx = context
        # lower-cased key -> single value (None: key missing for this connection)
        self._single: dict[str, str | None] = {
            "iot:clientid": ctx.client_id,
            "iot:domainname": ctx.domain_name,
            "aws:sourceip": ctx.source_ip,
            "iot:connection.thing.thingname": ctx.thing_name,
            "iot:connection.thing.thingtypename": (
                ctx.thing_type_name if ctx.thing_name is not None else None
            ),
            "iot:connection.thing.isattached": "true" if ctx.is_attached else "false",
        }

    # -- public lookups -------------------------------------------------------------------

    def substitution(self, name: str) -> str | None:
        """The text replacing ``${name}``, or ``None`` if it stays unresolved."""
        resolved = self._resolve(name)
        if resolved is None:
            return None
        values, multi, dn = resolved
        if multi or not values or not substitutable(values[0]):
            return None
        return escape_dn_value(values[0]) if dn else values[0]

    def values(self, key: str) -> tuple[str, ...] | None:
        """Context values of condition key ``key``; ``None`` when the key is missing."""
        resolved = self._resolve(key)
        if resolved is None:
            return None
        values, _multi, dn = resolved
        if not values:
            return None
        return tuple(escape_dn_value(v) for v in values) if dn else values

    # -- resolution -----------------------------------------------------------------------

    def _resolve(self, name: str) -> tuple[tuple[str, ...], bool, bool] | None:
        """(values, multi-valued, DN text) for a variable or key name, or None if missing."""
        lowered = name.lower()
        if lowered in self._single:
            value = self._single[lowered]
            return None if value is None else ((value,), False, False)
        if lowered == "iot:certificateid":
            cert_id = self._certificate_id
            return None if cert_id is None else ((cert_id,), False, False)
        if lowered == "iot:connectattributes":
            return tuple(sorted(self.context.connect_attributes)), True, False
        if lowered == "iot:certificate.serialnumber":
            cert = self.context.certificate
            return None if cert is None else ((str(cert.serial_number),), False, False)
        if lowered == "iot:certificate.availablekeys":
            return (self._available_keys, True, False) if self.context.certificate else None
        attribute = _ATTRIBUTE_KEY.fullmatch(name)
        if attribute is not None:
            if self.context.thing_name is None:
                return None
            value = self.context.thing_attributes.get(attribute.group(1))
            return None if value is None else ((value,), False, False)
        cert_key = _CERT_KEY.fullmatch(name)
        if cert_key is not None:
            return self._certificate_value(*cert_key.groups())
        return None

    def _certificate_value(self, scope: str, alt: str | None, kind: str,
                           index: str | None) -> tuple[tuple[str, ...], bool, bool] | None:
        canonical = _canonical_cert_key(scope, alt, kind)
        if canonical is None:
            return None
        attr = self._certificate_attributes.get(canonical)
        if attr is None:
            return None
        if index is None:
            return (attr.values[0],), False, attr.dn
        if index.lower() == "list":
            return attr.values, True, attr.dn
        position = int(index)  # ".1" is the second value (one-based index past the first)
        if position >= len(attr.values):
            return None
        return (attr.values[position],), False, attr.dn

    @cached_property
    def _certificate_id(self) -> str | None:
        if self.context.certificate_id is not None:
            return self.context.certificate_id
        if self.context.certificate is None:
            return None
        return pki.certificate_id(self.context.certificate)

    @cached_property
    def _certificate_attributes(self) -> dict[str, _Attribute]:
        """Canonical variable name -> values, for every populated certificate attribute."""
        cert = self.context.certificate
        if cert is None:
            return {}
        table: dict[str, _Attribute] = {}
        for scope, name in (("Subject", cert.subject), ("Issuer", cert.issuer)):
            for field_name, oid in _DN_FIELDS.items():
                values = tuple(
                    a.value if isinstance(a.value, str) else a.value.decode("utf-8", "replace")
                    for a in name.get_attributes_for_oid(oid)
                )[:MAX_ARRAY_ITEMS]
                if values:
                    table[f"iot:Certificate.{scope}.{field_name}"] = _Attribute(values, dn=True)
        alt_names: list[tuple[str, type[x509.ExtensionType]]] = [
            ("Subject", x509.SubjectAlternativeName),
            ("Issuer", x509.IssuerAlternativeName),
        ]
        for scope, ext_type in alt_names:
            try:
                ext = cert.extensions.get_extension_for_class(ext_type)  # type: ignore[type-var]
            except x509.ExtensionNotFound:
                continue
            general_names: x509.GeneralNames = ext.value  # type: ignore[assignment]
            for kind, cls in _ALT_NAME_KINDS.items():
                found = tuple(_general_name_text(g) for g in general_names
                              if isinstance(g, cls))[:MAX_ARRAY_ITEMS]
                if found:
                    table[f"iot:Certificate.{scope}.AlternativeName.{kind}"] = _Attribute(
                        found, dn=False
                    )
        return table

    @cached_property
    def _available_keys(self) -> tuple[str, ...]:
        keys = list(self._certificate_attributes)
        if self.context.certificate is not None:
            keys.append("iot:Certificate.SerialNumber")
        return tuple(sorted(keys))


def _general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DirectoryName):
        return name.value.rfc4514_string()
    return str(name.value)


_DN_CANONICAL = {k.lower(): k for k in _DN_FIELDS}
_ALT_CANONICAL = {k.lower(): k for k in _ALT_NAME_KINDS}


def _canonical_cert_key(scope: str, alt: str | None, kind: str) -> str | None:
    scope_name = _SCOPES[scope.lower()]
    if alt is None:
        field_name = _DN_CANONICAL.get(kind.lower())
        return None if field_name is None else f"iot:Certificate.{scope_name}.{field_name}"
    alt_kind = _ALT_CANONICAL.get(kind.lower())
    if alt_kind is None:
        return None
    return f"iot:Certificate.{scope_name}.AlternativeName.{alt_kind}"
