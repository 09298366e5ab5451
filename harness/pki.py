"""Keys, CSRs, certificate authorities and certificate ids.

Everything here is synchronous and CPU-bound; callers on an event loop run it in
an executor (RSA-2048 generation costs ~37 ms, see perf-notes). Private keys are
written with mode 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: AWS-issued device certificates expire here (spec fleet-provisioning.md §1.2).
AWS_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
#: Issuer text AWS puts in device certificates, as a single OU attribute (§1.2).
AWS_ISSUER_OU = "Amazon Web Services O=Amazon.com Inc. L=Seattle ST=Washington C=US"


def generate_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def generate_ec_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {
        "P-256": ec.SECP256R1(),
        "P-384": ec.SECP384R1(),
        "P-521": ec.SECP521R1(),
    }
    return ec.generate_private_key(curves[curve])


def private_key_pem(key: PrivateKey, *, pkcs1: bool = True) -> str:
    """PEM of a private key: PKCS#1 (``BEGIN RSA PRIVATE KEY``) for RSA as AWS returns it,
    SEC1 (``BEGIN EC PRIVATE KEY``) for EC; PKCS#8 when ``pkcs1`` is false."""
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if pkcs1
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(
        serialization.Encoding.PEM, fmt, serialization.NoEncryption()
    ).decode()


def public_key_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def load_private_key(pem: str | bytes, *, check: bool = True) -> PrivateKey:
    """Parse a PEM private key (RSA or EC).

    ``check=False`` skips OpenSSL's consistency check of an RSA key (~44 ms of CPU for
    RSA-2048 here, against 0.02 ms for the parse): for load generators holding keys that
    the endpoint under test just made, whose TLS handshake proves the key anyway.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    key = serialization.load_pem_private_key(data, password=None,
                                             unsafe_skip_rsa_key_validation=not check)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("only RSA and EC private keys are supported")
    return key


def load_certificate(pem: str | bytes) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def certificate_id(cert: x509.Certificate | str | bytes) -> str:
    """AWS's certificate id: lowercase hex SHA-256 of the DER encoding
    (spec iot-broker-and-policy.md §2.1). Accepts a certificate, PEM text or DER bytes."""
    if isinstance(cert, x509.Certificate):
        der = cert.public_bytes(serialization.Encoding.DER)
    elif isinstance(cert, str) or (isinstance(cert, bytes) and cert.lstrip().startswith(b"-----")):
        der = load_certificate(cert).public_bytes(serialization.Encoding.DER)
    else:
        der = cert
    return hashlib.sha256(der).hexdigest()


def make_csr(key: PrivateKey, common_name: str = "fleetbench device",
             extra: Sequence[tuple[x509.ObjectIdentifier, str]] = ()) -> str:
    """PEM of a PKCS#10 CSR signed by ``key``."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attrs += [x509.NameAttribute(oid, value) for oid, value in extra]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def write_secret(path: Path, text: str) -> None:
    """Write a private key (or any secret) with mode 0600, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, text: str) -> None:
    """Write a certificate or other public file atomically (mode 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _serial() -> int:
    # 20 bytes like AWS's serials, positive (top bit cleared).
    return int.from_bytes(os.urandom(20), "big") >> 1


@dataclass
class CertificateAuthority:
    """The emulator's root CA: signs its server certificate and every certificate it issues.

    One EC P-256 key (signing is ~2.5x cheaper than RSA, see perf-notes) unless
    created with ``key_type="RSA"``.
    """

    key: PrivateKey
    cert: x509.Certificate

    @functools.cached_property
    def pem(self) -> str:
        return certificate_pem(self.cert)

    @functools.cached_property
    def _issued_base(self) -> x509.CertificateBuilder:
        """What every certificate this CA issues starts with: its issuer name, ``CA:FALSE``
        and the CA's key identifier (a SHA-1 of its public key). Builders are immutable, so
        one is shared by every issue instead of being rebuilt per certificate."""
        return (
            x509.CertificateBuilder()
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )

    @classmethod
    def create(cls, common_name: str = "fleetbench emulator root CA",
               key_type: str = "EC") -> CertificateAuthority:
        key: PrivateKey = generate_ec_key() if key_type == "EC" else generate_rsa_key()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetbench"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        cert = (
            _self_signed_builder(key, name, days=3650)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        """Reuse ``directory/ca.pem`` + ``ca.key`` if present, else create them (key 0600)."""
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            return cls(key=load_private_key(key_path.read_bytes()),
                       cert=load_certificate(cert_path.read_bytes()))
        ca = cls.create()
        write_secret(key_path, private_key_pem(ca.key, pkcs1=False))
        write_public(cert_path, ca.pem)
        return ca

    def _builder(self, subject: x509.Name, public_key: object, not_before: dt.datetime,
                 not_after: dt.datetime) -> x509.CertificateBuilder:
        return (
            self._issued_base
            .subject_name(subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                critical=False,
            )
        )

    def issue_server_certificate(self, key: PrivateKey, names: Iterable[str]) -> x509.Certificate:
        """A TLS server certificate for ``names`` (DNS names or IP addresses)."""
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetbench emulator")])
        return (
            self._builder(subject, key.public_key(), now - dt.timedelta(days=1),
                          now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_device_certificate(
        self,
        public_key: object,
        subject: x509.Name | None = None,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime = AWS_NOT_AFTER,
    ) -> x509.Certificate:
        """A device certificate as AWS issues them: CN ``AWS IoT Certificate`` unless a subject
        is given, valid to 2049-12-31, ``CA:FALSE`` and ``digitalSignature`` (critical)."""
        start = not_before or (_now() - dt.timedelta(minutes=1))
        return (
            self._builder(subject or _AWS_DEVICE_SUBJECT, public_key, start, not_after)
            .add_extension(_DEVICE_KEY_USAGE, critical=True)
            .sign(self.key, hashes.SHA256())
        )


def self_signed_certificate(key: PrivateKey, common_name: str = "device",
                            days: int = 365) -> x509.Certificate:
    """A self-signed certificate (for RegisterCertificateWithoutCA and negative tests)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return _self_signed_builder(key, name, days=days).sign(key, hashes.SHA256())


def _self_signed_builder(key: PrivateKey, name: x509.Name, *,
                         days: int) -> x509.CertificateBuilder:
    """Subject and issuer ``name``, valid from a day ago for ``days`` days: the start of
    every certificate that signs itself (a root CA or a device's own)."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """``digitalSignature``, plus ``keyCertSign`` and ``cRLSign`` for a CA."""
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=signs_certificates, crl_sign=signs_certificates,
                         encipher_only=False, decipher_only=False)


#: The subject AWS gives the certificates it issues when no CSR subject is copied (§1.2).
_AWS_DEVICE_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AWS IoT Certificate")])
_DEVICE_KEY_USAGE = _key_usage(signs_certificates=False)
