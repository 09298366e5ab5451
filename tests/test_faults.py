"""Fault plans without a network: parsing (errors name file:line), selection (api, client id
glob, certificate, template, nth, probability, times), reproducibility, recording, and the
hook faults through a real HookRunner.

Spec: fleet-provisioning.md §1.5 (rejected payload), §4 (hook: 5 s limit, failure → 403).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.clock import Clock
from harness.emulator.faults import (
    DecisionPoint,
    Fault,
    FaultAction,
    FaultContext,
    FaultingHookRunner,
    FaultInjector,
    FaultPlan,
    FaultPlanError,
    FaultRule,
    delay,
    drop_response,
    hook_fail,
    hook_slow,
    load_fault_plan,
    parse_fault_plan_text,
    reject,
    restart_broker,
    stall_handshake,
)
from harness.emulator.hooks import REASON_TIMEOUT, HookInput, HookTargets
from harness.observations import Kind, ObservationLog

EXAMPLE = """\
seed: 7
rules:
  - name: lose-first-registration-reply
    api: RegisterThing
    client_id: "sn-*"
    nth: 1
    drop_response: true
  - api: CreateCertificateFromCsr
    probability: 0.25
    reject: {status_code: 500, error_code: InternalFailure}
  - api: Connect
    stall_handshake: 2.5
  - hook_slow: 6
  - api: CreateProvisioningClaim
    times: 2
    reject: ThrottlingException
  - api: RegisterThing
    nth: [40, 60]
    restart_broker: 0.5
"""


def _request(api: str, client_id: str = "sn-1", *, certificate_id: str | None = "cert",
             template: str | None = None) -> FaultContext:
    return FaultContext(DecisionPoint.REQUEST, api, client_id, certificate_id, template)


# --------------------------------------------------------------------------- parsing


def test_a_yaml_plan_parses_into_rules_at_their_decision_points(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(EXAMPLE)
    plan = load_fault_plan(path)
    assert plan.seed == 7
    assert [r.point for r in plan.rules] == [
        DecisionPoint.REQUEST, DecisionPoint.REQUEST, DecisionPoint.HANDSHAKE,
        DecisionPoint.HOOK, DecisionPoint.CONTROL_PLANE, DecisionPoint.REQUEST]
    first = plan.rules[0]
    assert (first.name, first.api, first.client_id, first.nth) == (
        "lose-first-registration-reply", "RegisterThing", "sn-*", (1,))
    assert first.fault == drop_response()
    assert plan.rules[1].fault == reject("InternalFailure", status_code=500)
    assert plan.rules[3].api == "RegisterThing" and plan.rules[3].fault == hook_slow(6)
    assert plan.rules[4].api == "iot:CreateProvisioningClaim" and plan.rules[4].times == 2
    assert plan.rules[5].fault == restart_broker(0.5) and plan.rules[5].nth == (40, 60)


@pytest.mark.parametrize(("text", "line", "message"), [
    ("rules:\n  - api: RegisterThing\n    delay: [2\n", 4, "not valid YAML"),
    ("rules:\n  - api: RegisterThing\n    drop_response: true\n  - api: RegistrThing\n"
     "    delay: 1\n", 4, "rules[1].api: unknown API 'RegistrThing' (did you mean RegisterThing"),
    ("seed: 1\nrules:\n  - api: RegisterThing\n    drop_respons: true\n", 4,
     "rules[0].drop_respons: unknown key"),
    ("rules:\n  - api: RegisterThing\n    delay: 1\n    drop_response: true\n", 2,
     "rules[0]: expected exactly one action"),
    ("rules:\n  - api: Connect\n    client_id: a*\n    stall_handshake: 1\n", 3,
     "rules[0].client_id: a TLS handshake is stalled before the client id"),
    ("rules:\n  - api: CreateKeysAndCertificate\n    hook_fail: true\n", 3,
     "rules[0].hook_fail: hook_fail does not apply to CreateKeysAndCertificate"),
    ("rules:\n  - api: iot:CreateThing\n    drop_response: true\n", 3,
     "rules[0].drop_response: drop_response does not apply to iot:CreateThing"),
    ("rules:\n  - api: RegisterThing\n    stall_handshake: 1\n", 3,
     "rules[0].stall_handshake: stall_handshake does not apply to RegisterThing"),
    ("rules:\n  - api: CreateThing\n    client_id: sn-*\n    delay: 1\n", 3,
     "rules[0].client_id: a control-plane call has no MQTT client id"),
    ("rules:\n  - api: RegisterThing\n    nth: 0\n    delay: 1\n", 3, "rules[0].nth"),
    ("rules:\n  - api: RegisterThing\n    probability: 1.5\n    delay: 1\n", 3,
     "rules[0].probability"),
    ("rules:\n  - api: RegisterThing\n    reject: {status: 400}\n", 3,
     "rules[0].reject.status: unknown key"),
    ("rules:\n  - api: RegisterThing\n    delay: soon\n", 3, "rules[0].delay: expected a number"),
    ("seed: x\n", 1, "seed: expected an integer"),
    ("- just a list\n", 1, "expected a mapping"),
])
def test_a_bad_plan_file_is_refused_with_a_message_naming_the_line(
        tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(FaultPlanError) as raised:
        load_fault_plan(path)
    assert str(raised.value).startswith(f"{path}:{line}: ")
    assert message in str(raised.value)
    assert raised.value.line == line


def test_a_missing_plan_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FaultPlanError, match=r"nope\.yaml: cannot read the plan"):
        load_fault_plan(tmp_path / "nope.yaml")


def test_an_empty_file_is_an_empty_plan() -> None:
    assert parse_fault_plan_text("") == FaultPlan()
    assert parse_fault_plan_text("rules: []\n") == FaultPlan()


faults = st.one_of(
    st.floats(min_value=0.001, max_value=60).map(delay),
    st.just(drop_response()),
    st.builds(reject, st.sampled_from([None, "ThrottlingException", "AccessDenied"]),
              status_code=st.sampled_from([None, 400, 429, 500]),
              message=st.sampled_from([None, "no"])),
    st.just(Fault(FaultAction.DISCONNECT_BEFORE)),
    st.just(Fault(FaultAction.DISCONNECT_AFTER)),
    st.floats(min_value=0, max_value=5).map(restart_broker),
)
rules = st.builds(
    FaultRule, faults,
    api=st.sampled_from([None, "RegisterThing", "CreateKeysAndCertificate"]),
    client_id=st.sampled_from([None, "sn-*", "dev-[0-9]"]),
    nth=st.lists(st.integers(min_value=1, max_value=9), max_size=3).map(tuple),
    probability=st.sampled_from([1.0, 0.5, 0.0]),
    times=st.sampled_from([None, 1, 3]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(rules, max_size=5), st.integers(min_value=0, max_value=2**31))
def test_a_plan_survives_its_wire_format(plan_rules: list[FaultRule], seed: int) -> None:
    plan = FaultPlan(tuple(plan_rules), seed)
    assert FaultPlan.from_wire(plan.to_wire()) == plan


# --------------------------------------------------------------------------- selection


def test_selectors_match_api_client_id_glob_certificate_and_template() -> None:
    rule = FaultRule(drop_response(), api="RegisterThing", client_id="sn-*",
                     certificate_id="cert", template="tpl")
    assert rule.selects(_request("RegisterThing", template="tpl"))
    assert not rule.selects(_request("RegisterThing", template="other"))
    assert not rule.selects(_request("RegisterThing", "dev-1", template="tpl"))
    assert not rule.selects(_request("RegisterThing", certificate_id="x", template="tpl"))
    assert not rule.selects(_request("CreateKeysAndCertificate"))
    any_api = FaultRule(delay(1))
    assert any_api.selects(_request("CreateCertificateFromCsr"))
    assert not any_api.selects(FaultContext(DecisionPoint.CONTROL_PLANE, "iot:CreateThing"))


def test_nth_acts_on_the_chosen_matches_only_and_times_caps_the_rule() -> None:
    injector = FaultInjector(FaultPlan((
        FaultRule(drop_response(), api="RegisterThing", nth=(2, 4)),
        FaultRule(delay(1), api="CreateKeysAndCertificate", times=2),
    )))
    fired = [injector.decide(_request("RegisterThing")) is not None for _ in range(5)]
    assert fired == [False, True, False, True, False]
    fired = [injector.decide(_request("CreateKeysAndCertificate")) is not None
             for _ in range(4)]
    assert fired == [True, True, False, False]
    assert [(c.matched, c.applied) for c in injector.counters()] == [(5, 2), (4, 2)]


def test_the_first_rule_that_fires_applies_and_later_ones_still_count() -> None:
    injector = FaultInjector(FaultPlan((
        FaultRule(reject("AccessDenied"), api="RegisterThing", nth=(1,)),
        FaultRule(drop_response(), api="RegisterThing"),
    )))
    first = injector.decide(_request("RegisterThing"))
    second = injector.decide(_request("RegisterThing"))
    assert first is not None and first.action is FaultAction.REJECT
    assert second is not None and second.action is FaultAction.DROP_RESPONSE
    assert second.occurrence == 2  # the second rule saw both requests


def _decisions(seed: int, count: int) -> list[bool]:
    injector = FaultInjector(FaultPlan(
        (FaultRule(drop_response(), api="RegisterThing", probability=0.3),), seed))
    return [injector.decide(_request("RegisterThing")) is not None for _ in range(count)]


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=2**31))
def test_a_seeded_plan_replays_the_same_decisions(seed: int) -> None:
    assert _decisions(seed, 50) == _decisions(seed, 50)


def test_probability_draws_are_roughly_the_probability_and_differ_by_seed() -> None:
    assert 200 < sum(_decisions(1, 1000)) < 400
    assert _decisions(1, 100) != _decisions(2, 100)


def test_replacing_the_plan_restarts_counters_and_draws() -> None:
    injector = FaultInjector(FaultPlan(
        (FaultRule(drop_response(), api="RegisterThing", probability=0.5),), seed=3))
    first = [injector.decide(_request("RegisterThing")) is not None for _ in range(20)]
    injector.set_plan(injector.plan)
    assert [injector.decide(_request("RegisterThing")) is not None for _ in range(20)] == first
    injector.clear()
    assert injector.decide(_request("RegisterThing")) is None and injector.counters() == []


def test_every_applied_fault_is_recorded_with_its_rule_and_occurrence() -> None:
    log = ObservationLog(Clock())
    injector = FaultInjector(FaultPlan((
        FaultRule(reject("ThrottlingException"), api="RegisterThing", name="throttle-2nd",
                  nth=(2,), template="tpl"),
        FaultRule(stall_handshake(1.5)),
    )), observations=log)
    for _ in range(2):
        injector.decide(_request("RegisterThing", "sn-9", template="tpl"))
    assert injector.handshake_stall("127.0.0.1") == 1.5
    recorded = log.query(kinds=[Kind.FAULT])
    assert [o.detail["rule"] for o in recorded] == ["throttle-2nd", "stall_handshake@Connect"]
    first = recorded[0]
    assert (first.client_id, first.certificate_id) == ("sn-9", "cert")
    assert first.detail["occurrence"] == 2 and first.detail["errorCode"] == "ThrottlingException"
    assert recorded[1].detail["ip"] == "127.0.0.1" and recorded[1].detail["seconds"] == 1.5


def test_an_mqtt_reject_defaults_to_aws_status_codes_for_the_error_code() -> None:
    # spec fleet §1.5: 429 throttled, 500 internal, 403 access denied, 400 otherwise
    assert reject("ThrottlingException").mqtt_rejection("RegisterThing").to_payload() == {
        "statusCode": 429, "errorCode": "ThrottlingException",
        "errorMessage": "Rate exceeded for RegisterThing."}
    assert reject().mqtt_rejection("RegisterThing").status_code == 500
    assert reject("AccessDenied").mqtt_rejection("RegisterThing").status_code == 403
    assert reject("Whatever", message="m").mqtt_rejection("X").to_payload() == {
        "statusCode": 400, "errorCode": "Whatever", "errorMessage": "m"}
    error = reject("ServiceUnavailableException").control_plane_error()
    assert (error.status, error.code) == (503, "ServiceUnavailableException")
    custom = reject("MadeUpException", status_code=418).control_plane_error()
    assert (custom.status, custom.code) == (418, "MadeUpException")


# --------------------------------------------------------------------------- hook faults

HOOK_ARN = "arn:aws:lambda:us-east-1:123456789012:function:hook"
TEMPLATE_ARN = "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/tpl"


def _hook_input(client_id: str = "sn-1") -> HookInput:
    return HookInput(claim_certificate_id="claim", certificate_id="new",
                     certificate_pem="-----BEGIN CERTIFICATE-----\n...", template_arn=TEMPLATE_ARN,
                     client_id=client_id, parameters={"SerialNumber": "1"})


def _runner(*rules: FaultRule, timeout: float = 0.5) -> FaultingHookRunner:
    targets = HookTargets({HOOK_ARN: "python:tests.hooks_fixtures:allow_async"})
    return FaultingHookRunner(targets, faults=FaultInjector(FaultPlan(rules)), timeout=timeout)


def test_hook_fail_denies_without_calling_the_hook() -> None:
    # spec fleet §4: a failing hook fails RegisterThing
    runner = _runner(FaultRule(hook_fail(), template="tpl"))
    outcome = asyncio.run(runner.invoke(HOOK_ARN, _hook_input()))
    assert not outcome.allowed and outcome.reason.startswith("error: ")


def test_a_slow_hook_within_the_limit_still_allows() -> None:
    runner = _runner(FaultRule(hook_slow(0.1), client_id="sn-*"))
    outcome = asyncio.run(runner.invoke(HOOK_ARN, _hook_input()))
    assert outcome.allowed


def test_a_hook_slowed_past_the_limit_times_out() -> None:
    # spec fleet §4: no answer within the limit (AWS: 5 s) → denied
    runner = _runner(FaultRule(hook_slow(10)), timeout=0.2)
    outcome = asyncio.run(runner.invoke(HOOK_ARN, _hook_input()))
    assert (outcome.allowed, outcome.reason) == (False, REASON_TIMEOUT)


def test_hook_faults_select_by_template_and_leave_other_hooks_alone() -> None:
    runner = _runner(FaultRule(hook_fail(), template="other"))
    assert asyncio.run(runner.invoke(HOOK_ARN, _hook_input())).allowed
