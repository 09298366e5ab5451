"""harness.pki.load_private_key: OpenSSL's RSA consistency check is on unless a load
generator turns it off (it costs ~44 ms of CPU per RSA-2048 key)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import pki


def _inconsistent_rsa_pem() -> str:
    good = pki.generate_rsa_key().private_numbers()
    bad = rsa.RSAPrivateNumbers(good.p, good.q, good.d, good.dmp1 ^ 2, good.dmq1, good.iqmp,
                                good.public_numbers)
    return pki.private_key_pem(bad.private_key(unsafe_skip_rsa_key_validation=True))


def test_a_key_is_checked_by_default_and_an_inconsistent_rsa_key_is_refused() -> None:
    with pytest.raises(ValueError):
        pki.load_private_key(_inconsistent_rsa_pem())


def test_an_unchecked_load_parses_the_same_keys() -> None:
    for key in (pki.generate_rsa_key(), pki.generate_ec_key()):
        pem = pki.private_key_pem(key)
        checked, unchecked = pki.load_private_key(pem), pki.load_private_key(pem, check=False)
        assert checked.private_numbers() == unchecked.private_numbers()
    assert isinstance(pki.load_private_key(_inconsistent_rsa_pem(), check=False),
                      rsa.RSAPrivateKey)
