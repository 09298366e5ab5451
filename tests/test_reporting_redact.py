"""Secrets never reach a report: private keys, claim keys and ownership tokens are masked."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.reporting.redact import (
    MARKER,
    PEM_MARKER,
    contains_secret,
    is_secret_key,
    redact,
    redact_text,
)
from tests.test_reporting_samples import PEM, PEM_BODY_LINE, TOKEN


# spec fleet-provisioning §1.2: the accepted payload carries the new private key as PEM
def test_a_pem_private_key_block_is_replaced_whole():
    text = f"before\n{PEM}after"
    out = redact_text(text)
    assert PEM_BODY_LINE not in out
    assert out == f"before\n{PEM_MARKER}\nafter"


# spec fleet-provisioning §1.2, §7: PEM strings travel inside JSON with \n escapes
def test_a_json_escaped_private_key_in_a_log_line_is_masked():
    line = json.dumps({"certificateId": "ab" * 32, "privateKey": PEM})
    out = redact_text(f"rx accepted {line}")
    assert PEM_BODY_LINE not in out
    assert "ab" * 32 in out
    assert json.loads(out.removeprefix("rx accepted "))["privateKey"] == MARKER


def test_a_private_key_cut_off_by_truncation_is_masked_at_either_end():
    lines = PEM.splitlines()
    head_only = "log start\n" + "\n".join(lines[:3])
    tail_only = "\n".join(lines[2:]) + "\nlog end"
    assert lines[1] not in redact_text(head_only)
    assert redact_text(head_only).startswith("log start\n")
    out = redact_text(tail_only)
    assert lines[2] not in out and "PRIVATE KEY-----" not in out
    assert out.endswith("log end")


# spec fleet-provisioning §1.6: the certificate ownership token is a secret
def test_secret_named_keys_are_masked_in_mappings_at_any_depth():
    data = {
        "certificateOwnershipToken": TOKEN,
        "certificateId": "c0ffee",
        "nested": [{"keyPair": {"PrivateKey": PEM, "PublicKey": "pub"}}],
        "claim_key": "/etc/fleet/claim.key",
        "aws_secret_access_key": "wJalr",
        "token": None,
    }
    out = redact(data)
    assert out["certificateOwnershipToken"] == MARKER
    assert out["nested"][0]["keyPair"]["PrivateKey"] == MARKER
    assert out["nested"][0]["keyPair"]["PublicKey"] == "pub"
    assert out["claim_key"] == MARKER
    assert out["aws_secret_access_key"] == MARKER
    assert out["certificateId"] == "c0ffee"
    assert out["token"] is None


def test_secret_named_values_in_log_text_are_masked_in_every_notation():
    text = (f"token={TOKEN} next\n"
            f"'certificateOwnershipToken': '{TOKEN}', 'thingName': 'thing-1'\n"
            f"privateKey: {TOKEN}\n")
    out = redact_text(text)
    assert TOKEN not in out
    assert "token=[REDACTED] next" in out
    assert "'thingName': 'thing-1'" in out


def test_tokens_the_caller_knows_are_masked_even_without_a_key_name():
    assert redact_text("the device sent abc123secret twice", ["abc123secret"]) == (
        f"the device sent {MARKER} twice")


def test_ids_thing_names_and_ordinary_keys_are_left_alone():
    data = {"thingName": "t", "certificateId": "ab", "device_id": "d", "keys": 3,
            "tags": [{"Key": "env", "Value": "lab"}], "PublicKey": "-----BEGIN PUBLIC KEY-----",
            "tokens_issued": 2, "error_code": "InvalidCertificateOwnershipToken"}
    assert redact(data) == data
    assert not is_secret_key("certificateId")
    assert is_secret_key("certificate-ownership-token")


def test_redaction_is_idempotent():
    text = f"token={TOKEN} 'privateKey': '{PEM}' {PEM}"
    once = redact_text(text)
    assert redact_text(once) == once


_plain = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | _plain,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_plain, inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(data=_json_like, where=st.sampled_from(["privateKey", "PrivateKey", "token",
                                               "certificateOwnershipToken", "text"]))
def test_a_planted_key_or_token_never_survives_redaction(data, where):
    # spec fleet-provisioning §1.2, §1.6, §2.2
    planted = {"payload": data}
    if where == "text":
        planted["log"] = f"x {PEM} y token={TOKEN}"
    else:
        planted[where] = {"value": PEM, "other": TOKEN} if where == "token" else f"{PEM}{TOKEN}"
    out = json.dumps(redact(planted))
    assert not contains_secret(out, [TOKEN, PEM_BODY_LINE])
