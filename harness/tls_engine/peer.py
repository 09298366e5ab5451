"""The peer certificate as the stdlib shows it, and its name rules."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID


def _name_tuple(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
    short = {NameOID.COMMON_NAME: "commonName", NameOID.ORGANIZATION_NAME: "organizationName",
             NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
             NameOID.COUNTRY_NAME: "countryName", NameOID.LOCALITY_NAME: "localityName",
             NameOID.STATE_OR_PROVINCE_NAME: "stateOrProvinceName",
             NameOID.SERIAL_NUMBER: "serialNumber"}
    return tuple(tuple((short.get(a.oid, a.oid.dotted_string), str(a.value)) for a in rdn)
                 for rdn in name.rdns)


def _asn1_time(when: dt.datetime) -> str:
    """OpenSSL's ASN1_TIME_print form, as the stdlib returns it: ``Jan  5 09:03:00 2026 GMT``."""
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S %Y} GMT"


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as the stdlib prints a SAN: IPv6 as eight uncompressed hex groups."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ":".join(f"{int.from_bytes(ip.packed[i:i + 2], 'big'):X}" for i in range(0, 16, 2))
    return str(ip)


def _alt_names(cert: x509.Certificate) -> list[tuple[str, str]]:
    """The subject alternative names in certificate order, named as the stdlib names them."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[tuple[str, str]] = []
    for general in san:
        if isinstance(general, x509.DNSName):
            names.append(("DNS", general.value))
        elif isinstance(general, x509.IPAddress) and not isinstance(
                general.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            names.append(("IP Address", _ip_text(general.value)))
        elif isinstance(general, x509.UniformResourceIdentifier):
            names.append(("URI", general.value))
        elif isinstance(general, x509.RFC822Name):
            names.append(("email", general.value))
    return names


def _serial_text(serial: int) -> str:
    """Upper-case hex in whole bytes (``0ABC``), as the stdlib prints a serial number."""
    text = f"{serial:X}"
    return "0" + text if len(text) % 2 else text


class PeerCertificate(Mapping[str, Any]):
    """``getpeercert()``'s dictionary, computed on first use (uvloop asks for it on every
    handshake and nobody in the project reads it), from a certificate or its DER."""

    __slots__ = ("_cert", "_dict")

    def __init__(self, cert: x509.Certificate | bytes) -> None:
        self._cert = cert
        self._dict: dict[str, Any] | None = None

    def _data(self) -> dict[str, Any]:
        if self._dict is None:
            cert = self._cert
            if isinstance(cert, bytes):
                cert = x509.load_der_x509_certificate(cert)
            data: dict[str, Any] = {
                "subject": _name_tuple(cert.subject), "issuer": _name_tuple(cert.issuer),
                "version": cert.version.value + 1, "serialNumber": _serial_text(cert.serial_number),
                "notBefore": _asn1_time(cert.not_valid_before_utc),
                "notAfter": _asn1_time(cert.not_valid_after_utc)}
            alt = _alt_names(cert)
            if alt:
                data["subjectAltName"] = tuple(alt)
            self._dict = data
        return self._dict

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


def hostname_matches(cert: x509.Certificate, hostname: str) -> bool:
    """RFC 6125 as OpenSSL applies it for the stdlib's ``check_hostname``: an IP address
    matches a SAN IP entry; a name matches a SAN DNS entry, a wildcard only as the whole
    left-most label; the subject CN counts only when the certificate has no DNS SAN."""
    alt = _alt_names(cert)
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        ip = None
    if ip is not None:
        return any(kind == "IP Address" and ipaddress.ip_address(v) == ip for kind, v in alt)
    host = hostname.lower()
    dns = [v.lower() for kind, v in alt if kind == "DNS"]
    if not dns:
        dns = [str(a.value).lower()
               for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    for pattern in dns:
        if pattern == host:
            return True
        suffix = pattern[2:]
        # a wildcard needs two labels after it (``*.com`` matches nothing)
        if pattern.startswith("*.") and "*" not in suffix and "." in suffix.strip("."):
            head, _, rest = host.partition(".")
            if head and rest == suffix:
                return True
    return False
