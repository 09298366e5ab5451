"""A sweep removes independent things in parallel, keeping AWS's order within each chain.

Checked against a live (in-process) emulator through boto3. The client is wrapped only to
note which call each thread made when: the teardown under test and the endpoint are real.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness import pki
from harness.endpoints.local import LocalEndpoint
from harness.teardown import ResourceKind, Teardown

#: Enough things that eight workers overlap, few enough to set up in a second or two.
THINGS = 24


@pytest.fixture(scope="module")
def emulator() -> Iterator[LocalEndpoint]:
    endpoint = LocalEndpoint.start(mode="in-process")
    yield endpoint
    endpoint.close()


@dataclass(frozen=True)
class Call:
    operation: str
    kwargs: dict[str, Any]
    started: float
    ended: float


class Recording:
    """The real boto3 client, noting each direct call with its start and end."""

    def __init__(self, iot: Any) -> None:
        self._iot = iot
        self._lock = threading.Lock()
        self.calls: list[Call] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._iot, name)
        if name in ("exceptions", "can_paginate", "get_paginator", "meta") or not callable(real):
            return real

        def call(**kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return real(**kwargs)
            finally:
                with self._lock:
                    self.calls.append(Call(name, kwargs, started, time.monotonic()))

        return call

    def max_in_flight(self, operation: str) -> int:
        edges = sorted([(c.started, 1) for c in self.calls if c.operation == operation]
                       + [(c.ended, -1) for c in self.calls if c.operation == operation])
        level = peak = 0
        for _, step in edges:
            level += step
            peak = max(peak, level)
        return peak


def make_devices(iot: Any, prefix: str, count: int) -> dict[str, str]:
    """``count`` things as RegisterThing leaves them: each with an ACTIVE certificate and a
    policy on it. Returns thing name -> certificate id."""
    policy = f"{prefix}-device"
    iot.create_policy(policyName=policy, policyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]}))
    csr = pki.make_csr(pki.generate_ec_key())  # one key: each certificate is still new
    made: dict[str, str] = {}
    for i in range(count):
        name = f"{prefix}-SN{i:03d}"
        iot.create_thing(thingName=name)
        cert = iot.create_certificate_from_csr(certificateSigningRequest=csr, setAsActive=True)
        iot.attach_policy(policyName=policy, target=cert["certificateArn"])
        iot.attach_thing_principal(thingName=name, principal=cert["certificateArn"])
        made[name] = cert["certificateId"]
    return made


def first(calls: list[Call], operation: str, key: str, value: str) -> float:
    """When the first ``operation`` call with ``key=value`` started."""
    found = [c.started for c in calls if c.operation == operation and c.kwargs[key] == value]
    assert found, f"no {operation} call with {key}={value}"
    return min(found)


def test_a_sweep_removes_things_in_parallel_in_awss_order_within_each_chain(
        emulator: LocalEndpoint) -> None:
    # spec broker §5.4: detach principals before DeleteThing; a certificate is detached
    # and not ACTIVE before DeleteCertificate
    prefix = f"fbtd{secrets.token_hex(3)}"
    devices = make_devices(emulator.iot, prefix, THINGS)
    iot = Recording(emulator.iot)

    report = Teardown(iot, prefix, workers=8).sweep()

    assert report.ok, report.summary()
    assert set(report.removed_names(ResourceKind.THING)) == set(devices)
    assert set(report.removed_names(ResourceKind.CERTIFICATE)) == set(devices.values())
    assert len(report.removed) == len(set(report.removed))  # each resource once
    assert iot.max_in_flight("delete_thing") > 1  # the chains overlapped
    for thing, cert in devices.items():
        detached = first(iot.calls, "detach_thing_principal", "thingName", thing)
        deleted = first(iot.calls, "delete_thing", "thingName", thing)
        inactive = first(iot.calls, "update_certificate", "certificateId", cert)
        gone = first(iot.calls, "delete_certificate", "certificateId", cert)
        assert detached < deleted < inactive < gone, thing
    left = [t["thingName"] for t in emulator.iot.list_things()["things"]
            if t["thingName"].startswith(prefix)]
    assert left == []


def test_a_parallel_sweep_reports_exactly_the_leftovers_a_sequential_one_does(
        emulator: LocalEndpoint) -> None:
    # a certificate also attached to a thing outside the run is left, with the reason
    for workers in (1, 8):
        prefix = f"fbtl{secrets.token_hex(3)}"
        devices = make_devices(emulator.iot, prefix, 10)
        shared = sorted(devices)[5]
        foreign = f"other{secrets.token_hex(3)}"
        emulator.iot.create_thing(thingName=foreign)
        arn = emulator.iot.describe_certificate(certificateId=devices[shared])[
            "certificateDescription"]["certificateArn"]
        emulator.iot.attach_thing_principal(thingName=foreign, principal=arn)

        report = Teardown(emulator.iot, prefix, workers=workers).sweep()

        leftovers = [(lo.resource.kind, lo.resource.name, lo.reason) for lo in report.leftovers]
        assert leftovers == [(ResourceKind.CERTIFICATE, devices[shared],
                              f"attached to thing {foreign}, which is not the run's")]
        assert set(report.removed_names(ResourceKind.THING)) == set(devices)
        assert set(report.removed_names(ResourceKind.CERTIFICATE)) == (
            set(devices.values()) - {devices[shared]})
        emulator.iot.detach_thing_principal(thingName=foreign, principal=arn)
        emulator.iot.delete_thing(thingName=foreign)
