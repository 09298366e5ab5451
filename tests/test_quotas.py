"""Quotas: parsing, AWS's default table, token buckets on the shared clock, and each quota
as a device or a boto3 client meets it on a running emulator.

Spec: fleet-provisioning.md §5 (rates, 429 on the rejected topic), iot-broker-and-policy.md
§1.8 (CONNECT per account / per client id), §5.2 (ThrottlingException 400, boto3 retries),
§5.4 (control-plane TPS).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import pki, protocol
from harness.admin_client import AdminApiError, AdminClient
from harness.clock import Clock
from harness.emulator.app import EmbeddedEmulator
from harness.emulator.quotas import (
    AWS_DEFAULTS,
    ApiKind,
    QuotaEnforcer,
    QuotaSet,
    QuotaSpecError,
    Rate,
    TokenBucket,
    add_quota_arguments,
    describe_quotas,
    parse_quota_spec,
    quotas_from_args,
    resolve_api,
)
from harness.errors import ThrottlingException
from harness.observations import Kind, ObservationLog
from harness.protocol import Api, ErrorResponse
from tests.test_provisioning_kit import (
    REGION,
    Identity,
    PahoDevice,
    Refused,
    create_template,
    factory_claim,
    fleet_template,
    running_emulator,
    unique,
)

# --------------------------------------------------------------------------- parsing


def test_api_names_resolve_to_one_canonical_spelling() -> None:
    # spec fleet §5: the MQTT API and the control-plane operation share names
    assert resolve_api("RegisterThing").kind is ApiKind.MQTT
    assert resolve_api("iot:RegisterThing").name == "iot:RegisterThing"
    assert resolve_api("CreateProvisioningClaim").name == "iot:CreateProvisioningClaim"
    assert resolve_api("Connect").kind is ApiKind.CONNECT
    with pytest.raises(ValueError, match="did you mean RegisterThing"):
        resolve_api("RegistrThing")


@pytest.mark.parametrize(("spec", "name", "per_second", "burst"), [
    ("RegisterThing=5/s", "RegisterThing", 5.0, 5.0),
    ("RegisterThing=5", "RegisterThing", 5.0, 5.0),
    ("CreateCertificateFromCsr=120/min", "CreateCertificateFromCsr", 2.0, 2.0),
    ("iot:CreateThing=15/s,burst=30", "iot:CreateThing", 15.0, 30.0),
    ("CreateProvisioningClaim=0.5/s", "iot:CreateProvisioningClaim", 0.5, 1.0),
])
def test_quota_specs_parse_to_rate_and_burst(spec: str, name: str, per_second: float,
                                             burst: float) -> None:
    api, rate = parse_quota_spec(spec)
    assert api.name == name
    assert rate == Rate(per_second, burst)


@pytest.mark.parametrize("spec", [
    "RegisterThing", "RegisterThing=", "RegisterThing=fast", "RegisterThing=0/s",
    "RegisterThing=5/h", "Nope=5/s", "Connect=5/s,burst=10", "RegisterThing=5/s,burst=0.5",
])
def test_bad_quota_specs_are_refused_with_what_was_expected(spec: str) -> None:
    with pytest.raises(QuotaSpecError):
        parse_quota_spec(spec)


def test_aws_preset_holds_every_default_and_specs_override_it() -> None:
    # spec fleet §5, broker §1.8: the defaults --quotas aws applies
    aws = QuotaSet.aws()
    assert {row.name for row in AWS_DEFAULTS} == set(aws.rates)
    assert aws.get("RegisterThing") == Rate.of(10)
    assert aws.get("CreateCertificateFromCsr") == Rate.of(100)
    assert aws.get("Connect") == Rate.of(500)
    assert aws.get("ConnectPerClientId") == Rate.of(1)
    tuned = QuotaSet.from_specs(["RegisterThing=50/s", "Connect=off"], preset="aws")
    assert tuned.get("RegisterThing") == Rate.of(50)
    assert "Connect" not in tuned.limits()
    assert tuned.broker_overrides() == {"account_connect_rate": None,
                                        "connect_rate_per_client_id": 1.0}
    assert not QuotaSet.none() and QuotaSet.none().broker_overrides() == {}


def test_the_readme_table_lists_every_default_with_its_source() -> None:
    table = describe_quotas()
    for row in AWS_DEFAULTS:
        assert f"`{row.name}`" in table
    assert "L-B2BBBD8C" in table and "S24" in table


rates = st.builds(
    Rate.of,
    st.floats(min_value=0.01, max_value=10_000, allow_nan=False).map(lambda v: round(v, 3)),
    st.one_of(st.none(), st.integers(min_value=1, max_value=10_000).map(float)))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["RegisterThing", "iot:CreateThing",
                                        "CreateKeysAndCertificate", "iot:DescribeThing"]),
                       st.one_of(st.none(), rates)))
def test_quota_sets_survive_the_admin_wire_format(entries: dict[str, Rate | None]) -> None:
    quotas = QuotaSet(entries)
    assert QuotaSet.from_wire(quotas.to_wire()) == quotas


def test_command_line_options_build_the_quota_set() -> None:
    parser = argparse.ArgumentParser()
    add_quota_arguments(parser)
    args = parser.parse_args(["--quotas", "aws", "--quota", "RegisterThing=5/s",
                              "--quota", "iot:CreateThing=off"])
    quotas = quotas_from_args(args)
    assert quotas.get("RegisterThing") == Rate.of(5)
    assert quotas.get("iot:CreateThing") is None
    assert quotas.get("CreateCertificateFromCsr") == Rate.of(100)
    assert not quotas_from_args(parser.parse_args([]))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--quota", "RegisterThng=5/s"])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------- token buckets


def test_a_bucket_lets_its_burst_through_then_refills_on_the_shared_clock() -> None:
    clock = Clock()
    bucket = TokenBucket(Rate.of(2.0), clock)
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]
    clock.advance(0.5)  # one token's worth
    assert bucket.try_acquire() and not bucket.try_acquire()
    clock.advance(3600)  # a jump refills up to the burst only
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]


class SteppedClock(Clock):
    """A clock that stands still unless advanced (real time is frozen at zero)."""

    def now(self) -> float:
        return self.offset


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(min_value=0.5, max_value=50), burst=st.integers(min_value=1, max_value=20),
       gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200))
def test_a_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(
        rate: float, burst: int, gaps: list[float]) -> None:
    # spec fleet §5: none exceeds the quota, whatever the arrival pattern
    clock = SteppedClock()
    bucket = TokenBucket(Rate(rate, float(burst)), clock)
    admitted = 0
    for gap in gaps:
        clock.advance(gap)
        admitted += bucket.try_acquire()
    assert admitted <= burst + rate * clock.offset + 1e-6


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(min_value=1, max_value=50), burst=st.integers(min_value=1, max_value=20),
       arrivals=st.lists(st.tuples(st.floats(min_value=0, max_value=0.2),
                                   st.floats(min_value=0, max_value=0.5)),
                         min_size=1, max_size=200))
def test_a_request_that_waited_on_a_busy_loop_is_charged_at_its_arrival(
        rate: float, burst: int, arrivals: list[tuple[float, float]]) -> None:
    # spec fleet §5 as a client sees it: within any window of arrival times no more than
    # burst + rate × window are admitted, however long each request waited to be checked
    clock = SteppedClock()
    bucket = TokenBucket(Rate(rate, float(burst)), clock)
    arrived = 0.0
    admitted: list[float] = []
    for gap, wait in arrivals:
        arrived += gap
        clock.advance(max(0.0, arrived + wait - clock.offset))  # checked after it arrived
        if bucket.try_acquire(at=arrived):
            admitted.append(arrived)
    for i, start in enumerate(admitted):
        for end in admitted[i:]:
            within = sum(1 for t in admitted[i:] if t <= end)
            assert within <= burst + rate * (end - start) + 1e-6


def test_a_late_check_does_not_refill_the_bucket_for_the_time_it_waited() -> None:
    clock = SteppedClock()
    bucket = TokenBucket(Rate.of(2.0), clock)
    assert bucket.try_acquire(at=0.0) and bucket.try_acquire(at=0.0)
    clock.advance(0.6)  # the loop was busy: the next request is checked 0.6 s after it came
    assert not bucket.try_acquire(at=0.1)  # it arrived when 0.2 of a token had come back
    assert bucket.try_acquire()  # charged now (0.6 s): a whole token is back


def test_the_enforcer_answers_429_on_mqtt_and_throttling_exception_on_the_control_plane() -> None:
    clock = SteppedClock()
    log = ObservationLog(clock)
    enforcer = QuotaEnforcer(QuotaSet.from_specs(["RegisterThing=1/s", "iot:CreateThing=1/s"]),
                             clock=clock, observations=log)
    assert enforcer.check_mqtt("RegisterThing") is None
    refusal = enforcer.check_mqtt("RegisterThing", client_id="dev-1")
    assert refusal is not None  # spec fleet §1.5/§5: 429 ThrottlingException
    assert (refusal.status_code, refusal.error_code) == (429, protocol.THROTTLING_CODE)
    assert enforcer.check_mqtt("CreateKeysAndCertificate") is None  # no quota, no limit
    enforcer.check_control_plane("CreateThing")
    with pytest.raises(ThrottlingException) as raised:  # spec broker §5.2: 400
        enforcer.check_control_plane("CreateThing")
    assert raised.value.status == 400 and raised.value.message == "Rate exceeded"
    throttled = log.query(kinds=[Kind.THROTTLED])
    assert [(o.detail["api"], o.client_id) for o in throttled] == [
        ("RegisterThing", "dev-1"), ("iot:CreateThing", None)]
    clock.advance(1.0)
    assert enforcer.check_mqtt("RegisterThing") is None


@pytest.mark.parametrize("row", AWS_DEFAULTS, ids=[row.name for row in AWS_DEFAULTS])
def test_every_aws_default_is_enforced_at_its_rate(row: Any) -> None:
    # spec fleet §5, broker §1.8/§5.4: each default of --quotas aws, one second's burst
    clock = SteppedClock()
    enforcer = QuotaEnforcer(QuotaSet.aws(), clock=clock)
    if resolve_api(row.name).kind is ApiKind.CONNECT:  # the broker's own limiters
        field = {"Connect": "account_connect_rate",
                 "ConnectPerClientId": "connect_rate_per_client_id"}[row.name]
        assert QuotaSet.aws().broker_overrides()[field] == row.per_second
        return
    burst = int(max(1.0, row.per_second))
    assert all(enforcer.admit(row.name) for _ in range(burst))
    assert not enforcer.admit(row.name)
    clock.advance(1.0 / row.per_second)
    assert enforcer.admit(row.name) and not enforcer.admit(row.name)


# --------------------------------------------------------------------------- on the emulator


@pytest.fixture(scope="module")
def emu() -> Iterator[EmbeddedEmulator]:
    with running_emulator() as emulator:
        yield emulator


@pytest.fixture
def admin(emu: EmbeddedEmulator) -> Iterator[AdminClient]:
    client = AdminClient(emu.info.api_url)
    yield client
    client.set_quotas()  # the module's other tests see no quota


@pytest.fixture(scope="module")
def claim(emu: EmbeddedEmulator) -> tuple[str, Identity]:
    template = create_template(emu, fleet_template())
    directory = Path(tempfile.mkdtemp(prefix="fleetbench-quotas-"))
    return template, factory_claim(emu, directory, template)


def _iot(emu: EmbeddedEmulator, **config: Any) -> Any:
    return boto3.client("iot", endpoint_url=emu.info.api_url, region_name=REGION,
                        aws_access_key_id="AKIDFLEETBENCH", aws_secret_access_key="secret",
                        config=Config(**config))


def _request(device: PahoDevice, api: Api, template: str) -> Any:
    if api is Api.CREATE_KEYS_AND_CERTIFICATE:
        return device.call(api, "json", b"{}")
    if api is Api.CREATE_CERTIFICATE_FROM_CSR:
        csr = pki.make_csr(pki.generate_ec_key())
        body = protocol.encode(protocol.CreateCertificateFromCsrRequest(csr), "json")
        return device.call(api, "json", body)
    body = protocol.encode(protocol.RegisterThingRequest("", {}), "json")
    return device.call(api, "json", body, template)


@pytest.mark.parametrize("api", list(Api), ids=[a.value for a in Api])
def test_an_mqtt_api_over_its_quota_is_rejected_with_429_until_the_bucket_refills(
        emu: EmbeddedEmulator, admin: AdminClient, claim: tuple[str, Identity],
        api: Api) -> None:
    # spec fleet §5, §1.5: a throttled request gets 429 ThrottlingException on rejected
    template, identity = claim
    admin.set_quotas({api.value: "1/s"})
    client_id = unique("quota")
    device = PahoDevice(emu, identity, client_id)
    try:
        first = _request(device, api, template)
        second = _request(device, api, template)
        assert isinstance(second, ErrorResponse)
        assert (second.status_code, second.error_code) == (429, "ThrottlingException")
        assert second.error_message == f"Rate exceeded for {api.value}."
        if isinstance(first, ErrorResponse):  # RegisterThing with an empty token
            assert first.status_code == 400
        admin.advance(1.0)  # the shared clock refills the bucket
        third = _request(device, api, template)
        assert not (isinstance(third, ErrorResponse) and third.status_code == 429)
    finally:
        device.close()
    throttled = admin.events(kinds=[Kind.THROTTLED], client_id=client_id)
    assert [o.detail["api"] for o in throttled] == [api.value]


def test_a_control_plane_operation_over_its_quota_raises_throttling_exception(
        emu: EmbeddedEmulator, admin: AdminClient) -> None:
    # spec broker §5.2, §5.4: ThrottlingException (400), modeled, so boto3 raises it by name
    admin.set_quotas({"iot:CreateThing": "1/s"})
    iot = _iot(emu, retries={"total_max_attempts": 1})
    iot.create_thing(thingName=unique("q"))
    with pytest.raises(iot.exceptions.ThrottlingException) as raised:
        iot.create_thing(thingName=unique("q"))
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    iot.describe_endpoint(endpointType="iot:Data-ATS")  # other operations are not limited


def test_boto3_retries_a_throttled_call_until_it_succeeds_as_with_aws(
        emu: EmbeddedEmulator, admin: AdminClient) -> None:
    # spec broker §5.2: "standard" mode retries ThrottlingException
    admin.set_quotas({"CreateProvisioningClaim": "10/s,burst=1"})
    template = create_template(emu, fleet_template())
    iot = _iot(emu, retries={"mode": "standard", "max_attempts": 10})
    retries = 0
    for _ in range(3):
        made = iot.create_provisioning_claim(templateName=template)
        retries += made["ResponseMetadata"]["RetryAttempts"]
    assert retries >= 1
    assert admin.events(kinds=[Kind.THROTTLED])[-1].detail["api"] == \
        "iot:CreateProvisioningClaim"


def test_connects_over_the_account_quota_are_refused_as_aws_does(
        emu: EmbeddedEmulator, admin: AdminClient, claim: tuple[str, Identity]) -> None:
    # spec broker §1.8: CONNECTs per account; MQTT 5 CONNACK 0x97, 3.1.1 closed without CONNACK
    _, identity = claim
    admin.set_quotas({"Connect": "1/s"})
    first = PahoDevice(emu, identity, unique("acct"))
    try:
        with pytest.raises(Refused, match="CONNACK 151"):
            PahoDevice(emu, identity, unique("acct"), version=5)
        with pytest.raises(Refused):
            PahoDevice(emu, identity, unique("acct"))
    finally:
        first.close()
    failed = admin.events(kinds=[Kind.CONNECT_FAILED])
    assert failed[-1].detail["reason"] == "throttled"


def test_the_per_client_id_connect_limit_is_on_by_default_and_a_quota_can_lift_it(
        emu: EmbeddedEmulator, admin: AdminClient, claim: tuple[str, Identity]) -> None:
    # spec broker §1.8: 1 CONNECT/s per client id (AWS: not adjustable)
    _, identity = claim
    client_id = unique("same")
    PahoDevice(emu, identity, client_id).close()
    with pytest.raises(Refused):
        PahoDevice(emu, identity, client_id)
    assert admin.set_quotas({"ConnectPerClientId": "off"}) == {"ConnectPerClientId": "off"}
    PahoDevice(emu, identity, client_id).close()
    PahoDevice(emu, identity, client_id).close()


def test_quotas_are_read_and_replaced_through_the_admin_api(admin: AdminClient) -> None:
    assert admin.quotas() == {}
    applied = admin.set_quotas({"RegisterThing": "50/s"}, preset="aws")
    assert applied["RegisterThing"] == "50/s" and applied["Connect"] == "500/s"
    assert admin.quotas() == applied
    with pytest.raises(AdminApiError) as raised:
        admin.set_quotas({"RegistrThing": "5/s"})
    assert raised.value.status == 400 and "RegistrThing" in raised.value.message
    assert admin.quotas() == applied  # a refused change changes nothing
    assert admin.set_quotas() == {}
