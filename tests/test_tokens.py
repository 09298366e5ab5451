"""Certificate ownership tokens: opaque, unforgeable, one hour, surviving a restart."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.emulator.tokens import (
    SECRET_FILE,
    TOKEN_LIFETIME_SECONDS,
    TOKEN_VERSION,
    TokenAuthority,
    TokenError,
    TokenProblem,
)

ACCOUNT = "123456789012"
CERT_ID = "ab" * 32
CLAIM_ID = "cd" * 32
NOW = 1_700_000_000.0


@pytest.fixture()
def authority() -> TokenAuthority:
    return TokenAuthority.ephemeral(account_id=ACCOUNT)


def test_a_token_reads_back_its_certificate_issue_time_and_claim(
        authority: TokenAuthority) -> None:
    # spec fleet §1.6: the token encodes certificate id, issue time and the issuing claim
    token = authority.issue(CERT_ID, issued_at=NOW, claim_certificate_id=CLAIM_ID)
    contents = authority.read(token, now=NOW + 1)
    assert contents.certificate_id == CERT_ID
    assert contents.issued_at == NOW
    assert contents.claim_certificate_id == CLAIM_ID
    assert contents.expires_at == NOW + TOKEN_LIFETIME_SECONDS


def test_a_token_is_opaque_and_shaped_like_aws(authority: TokenAuthority) -> None:
    # spec fleet §1.6 (observed): base64 of {"version":"20191023","cipher":...}, ~460 chars
    token = authority.issue(CERT_ID, issued_at=NOW, claim_certificate_id=CLAIM_ID)
    outer = json.loads(base64.b64decode(token))
    assert outer["version"] == TOKEN_VERSION and set(outer) == {"version", "cipher"}
    assert CERT_ID not in token and CERT_ID.encode() not in base64.b64decode(outer["cipher"])
    assert 300 < len(token) < 700


def test_two_tokens_for_the_same_certificate_differ(authority: TokenAuthority) -> None:
    # unguessable: a fresh nonce per token
    assert authority.issue(CERT_ID, issued_at=NOW) != authority.issue(CERT_ID, issued_at=NOW)


def test_a_token_expires_after_one_hour(authority: TokenAuthority) -> None:
    # spec fleet §1.6: lifetime one hour from issuance
    token = authority.issue(CERT_ID, issued_at=NOW)
    authority.read(token, now=NOW + TOKEN_LIFETIME_SECONDS - 0.001)
    with pytest.raises(TokenError) as caught:
        authority.read(token, now=NOW + TOKEN_LIFETIME_SECONDS)
    assert caught.value.problem is TokenProblem.EXPIRED


def test_a_token_from_another_endpoint_is_unknown(authority: TokenAuthority) -> None:
    # spec fleet §1.5: unknown token → InvalidCertificateOwnershipToken
    other = TokenAuthority.ephemeral(account_id=ACCOUNT)
    with pytest.raises(TokenError) as caught:
        authority.read(other.issue(CERT_ID, issued_at=NOW), now=NOW)
    assert caught.value.problem is TokenProblem.UNKNOWN


def test_a_forged_token_with_an_altered_cipher_is_unknown(authority: TokenAuthority) -> None:
    outer = json.loads(base64.b64decode(authority.issue(CERT_ID, issued_at=NOW)))
    blob = bytearray(base64.b64decode(outer["cipher"]))
    blob[-1] ^= 1
    outer["cipher"] = base64.b64encode(bytes(blob)).decode()
    forged = base64.b64encode(json.dumps(outer).encode()).decode()
    with pytest.raises(TokenError) as caught:
        authority.read(forged, now=NOW)
    assert caught.value.problem is TokenProblem.UNKNOWN


@pytest.mark.parametrize("token", [
    "", "not base64!", base64.b64encode(b"[1, 2]").decode(),
    base64.b64encode(b'{"version":"20191023"}').decode(),
    base64.b64encode(b'{"version":"1","cipher":"AAAA"}').decode(),
    base64.b64encode(b'{"version":"20191023","cipher":"AAAA"}').decode(),
    "A" * 5000,
])
def test_a_malformed_token_is_refused_without_echoing_it(authority: TokenAuthority,
                                                         token: str) -> None:
    with pytest.raises(TokenError) as caught:
        authority.read(token, now=NOW)
    assert caught.value.problem is TokenProblem.MALFORMED
    assert str(caught.value) == TokenProblem.MALFORMED.value  # names the problem, not the token


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=600))
def test_arbitrary_text_never_reads_as_a_token(text: str) -> None:
    # spec fleet §1.6: unguessable; any refusal is a TokenError, never a crash
    authority = TokenAuthority.ephemeral(account_id=ACCOUNT)
    with pytest.raises(TokenError):
        authority.read(text, now=NOW)


def test_a_token_issued_for_another_account_is_refused(tmp_path: Path) -> None:
    first = TokenAuthority.load_or_create(tmp_path, account_id=ACCOUNT)
    second = TokenAuthority.load_or_create(tmp_path, account_id="210987654321")
    with pytest.raises(TokenError) as caught:
        second.read(first.issue(CERT_ID, issued_at=NOW), now=NOW)
    assert caught.value.problem is TokenProblem.OTHER_ACCOUNT


def test_tokens_survive_a_restart_and_the_key_file_is_private(tmp_path: Path) -> None:
    # task: secret kept 0600 in the data dir so tokens survive a restart
    token = TokenAuthority.load_or_create(tmp_path, account_id=ACCOUNT).issue(
        CERT_ID, issued_at=NOW)
    restarted = TokenAuthority.load_or_create(tmp_path, account_id=ACCOUNT)
    assert restarted.read(token, now=NOW + 10).certificate_id == CERT_ID
    mode = stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode)
    assert mode == 0o600
