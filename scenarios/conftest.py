"""Scenario-level fixtures, on top of the fleetbench plugin's.

The plugin (:mod:`harness.pytest_plugin`) gives ``endpoint``, ``fleet``, ``claim``,
``trusted_user``, ``device_factory``, ``observer`` and ``clock``. The scenarios share a
few more things, all judged from the endpoint (design principle 2):

* ``fleet_spec``: the run's fleet, with a thing group and a billing group so that every
  matrix scenario also checks memberships;
* ``claim_for(flow)``: a claim certificate or a trusted user's temporary claim;
* ``provision(device, inputs)``: one boot of a device, the endpoint's trace of it, and
  both recorded for the report (:func:`record_device`);
* ``watch``: the endpoint's observations (events of a kind, waiting for one);
* ``registry``: what the endpoint holds afterwards, read with boto3 only;
* ``connect_as(cert, key, client_id)``: a raw MQTT connection with any credentials;
* ``connect_rate_pause()``: lets AWS's one CONNECT per second per client id pass;
* ``make_fleet(body)``: a second fleet with its own template (and claim policy), for
  template, hook and negative scenarios; removed after the test;
* ``make_device(**options)``: a device of this test's kind with options only some kinds
  have (step control...); skips with the reason when the kind has no such option;
* ``hook_arn(name)``: a Lambda ARN the emulator maps to ``scenarios.hooks.<name>``.

The emulator imports hook targets as ``python:scenarios.hooks:<name>``; a subprocess
emulator inherits this process's environment, so the repository root is put on
``PYTHONPATH`` here, before any endpoint starts.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from devices.base import (
    ClaimCredentials,
    DeviceConfigError,
    DeviceInputs,
    DeviceResult,
    EndpointParams,
    Flow,
    option_names,
)
from devices.mqtt_transport import MqttTransport, TlsIdentity
from harness.endpoints.base import Endpoint, EndpointKind
from harness.fleet import Fleet, FleetSpec
from harness.observations import Kind
from harness.observer import Mark, Observer, ProvisioningTrace, StepKind
from harness.pytest_plugin import FleetbenchLeftoverWarning
from harness.pytest_report import DEVICE_PROPERTY, device_record
from harness.teardown import THING_TYPE_DELETE_DELAY_S, ResourceKind, cleanup_prefix

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Group and billing group of the run's fleet (created as ``<prefix>-<name>``).
RUN_THING_GROUP = "sensors"
RUN_BILLING_GROUP = "pilot"
#: Module of the pre-provisioning hook targets (spec fleet §4).
HOOKS_MODULE = "scenarios.hooks"
#: How long a scenario waits for a trace step that follows the device's last action.
TRACE_WAIT_S = 15.0
#: Just over AWS's window of one CONNECT per second per client id (spec broker §1.8).
CONNECT_RATE_WINDOW_S = 1.1


def _put_repo_on_pythonpath() -> None:
    """A subprocess emulator must be able to import ``scenarios.hooks``."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *parts])


_put_repo_on_pythonpath()


# --------------------------------------------------------------------------- the run's fleet


@pytest.fixture(scope="session")
def fleet_spec(fleet_spec: FleetSpec) -> FleetSpec:
    """The plugin's fleet, with a thing group and a billing group in its template."""
    return replace(fleet_spec, thing_groups=(RUN_THING_GROUP,),
                   billing_groups=(RUN_BILLING_GROUP,))


@pytest.fixture
def claim_for(fleet: Fleet) -> Callable[..., ClaimCredentials]:
    """``claim_for(flow, of=fleet)``: a claim certificate (by claim) or a temporary claim
    from CreateProvisioningClaim (by trusted user, spec fleet §2)."""

    def make(flow: Flow, of: Fleet | None = None) -> ClaimCredentials:
        owner = of or fleet
        if Flow(flow) is Flow.TRUSTED_USER:
            return owner.create_trusted_user_claim()
        return owner.create_claim()

    return make


# --------------------------------------------------------------------------- devices


@pytest.fixture
def connect_rate_pause(endpoint: Endpoint) -> Callable[[], None]:
    """Let AWS's one CONNECT per second per client id pass (spec broker §1.8) before a
    scenario reuses a client id: the emulated clock moves, AWS's real one must be waited."""

    def pause() -> None:
        clock = endpoint.clock
        if clock is not None:
            clock.advance(CONNECT_RATE_WINDOW_S)
        else:
            time.sleep(CONNECT_RATE_WINDOW_S)  # a quota window, not an event to wait for

    return pause


@pytest.fixture
def make_device(device_factory: Any) -> Callable[..., Any]:
    """A device of this test's kind with ``options``; skips when the kind lacks one of
    them (only the virtual device has ``control``, the StepControl of negative flows)."""

    def make(**options: Any) -> Any:
        missing = sorted(set(options) - set(option_names(device_factory.kind)))
        if missing:
            pytest.skip(f"device kind {device_factory.kind!r} has no {', '.join(missing)} "
                        "option, which this scenario needs")
        return device_factory(**options)

    return make


@dataclass(frozen=True)
class Outcome:
    """One device run: what it was given, what it says, what the endpoint saw."""

    inputs: DeviceInputs
    result: DeviceResult
    trace: ProvisioningTrace
    mark: Mark
    policies_before: frozenset[str] | None = None

    def assert_provisioned(self) -> str:
        """The endpoint saw the whole flow (claim connection, certificate, thing,
        reconnection with it); returns the new certificate's id. The device's own account
        is in the message, as evidence."""
        assert self.trace.provisioned, (
            f"the endpoint did not see a complete provisioning:\n{self.trace}\n"
            f"the device's account: {self.result.to_json(indent=2)}")
        certificate_id = self.trace.certificate_id
        assert certificate_id is not None
        return certificate_id

    @property
    def created_certificates(self) -> frozenset[str]:
        """Certificates made for this device: the endpoint's word, and the device's
        (on AWS the trace does not see certificates that never connected)."""
        seen = {s.certificate_id for s in self.trace.of(StepKind.CERTIFICATE_CREATED)
                if s.certificate_id}
        if self.result.certificate_id:
            seen.add(self.result.certificate_id)
        return frozenset(seen)


def record_device(node: pytest.Item, result: DeviceResult, trace: ProvisioningTrace | None,
                  inputs: DeviceInputs | None) -> None:
    """Attach a device run to the test's report entry (as ``device_factory.record`` does).

    A device run twice in one scenario (a reboot, a factory reset) is recorded twice; the
    report gives the second record ``#2`` on its id (:class:`harness.pytest_report.RunRecorder`).
    """
    record = device_record(result, trace=trace, inputs=inputs).to_dict()
    node.user_properties.append((DEVICE_PROPERTY, record))


class Watch:
    """What the endpoint saw, read through the run's observer (emulator log or AWS events)."""

    def __init__(self, observer: Observer, endpoint: Endpoint) -> None:
        self.observer = observer
        self.endpoint = endpoint

    @property
    def emulated(self) -> bool:
        """Whether the endpoint is an emulator (full trace, rejections, clock)."""
        return self.endpoint.supports_emulator_extensions

    def events(self, since: Outcome | Mark, *, client_id: str | None = None,
               certificate_id: str | None = None, kind: Kind | None = None) -> list[Any]:
        """Observations since ``since`` (an outcome's mark), optionally of one kind."""
        mark = since.mark if isinstance(since, Outcome) else since
        found = self.observer.events(client_id=client_id, certificate_id=certificate_id,
                                     since=mark)
        return [o for o in found if kind is None or o.kind == kind.value]

    def wait_for_event(self, since: Outcome | Mark, kind: Kind, *,
                       client_id: str | None = None, certificate_id: str | None = None,
                       timeout: float = TRACE_WAIT_S) -> Any:
        """The first ``kind`` observation since ``since`` (None after ``timeout``)."""
        found = self.observer.wait_for(
            lambda: self.events(since, client_id=client_id, certificate_id=certificate_id,
                                kind=kind), timeout)
        return found[0] if found else None

    def trace_until(self, client_id: str | None, since: Mark,
                    predicate: Callable[[ProvisioningTrace], bool],
                    timeout: float = TRACE_WAIT_S) -> ProvisioningTrace:
        """``client_id``'s trace once ``predicate`` holds (or after ``timeout``)."""
        return self.observer.trace(client_id=client_id, since=since, until=predicate,
                                   timeout=timeout)


@pytest.fixture(scope="session")
def watch(observer: Observer, endpoint: Endpoint) -> Watch:
    return Watch(observer, endpoint)


class Provision(Watch):
    """``provision(device, inputs)``: boot once, read the trace, record both."""

    def __init__(self, factory: Any, watch: Watch, registry: Registry,
                 node: pytest.Item) -> None:
        super().__init__(watch.observer, watch.endpoint)
        self.factory = factory
        self.registry = registry
        self.node = node

    def __call__(self, device: Any, inputs: DeviceInputs, *, snapshot: bool = False,
                 timeout: float = TRACE_WAIT_S) -> Outcome:
        """Run ``device`` once; ``snapshot`` notes the account's policies first, so that
        :meth:`Registry.assert_left_nothing` can tell new ones."""
        before = self.registry.policy_names() if snapshot else None
        mark = self.observer.mark()
        try:
            result = device.provision(inputs)
        except DeviceConfigError as exc:
            pytest.skip(f"device kind {self.factory.kind!r} cannot run this scenario: {exc}")
        if result.ok:
            until: StepKind | None = StepKind.RECONNECTED
        elif result.error is not None and self.emulated:
            until = StepKind.REJECTED  # AWS does not report rejections to observers
        else:
            until = None
        trace = self.observer.trace(client_id=inputs.client_id, since=mark, until=until,
                                    timeout=timeout)
        record_device(self.node, result, trace, inputs)
        return Outcome(inputs, result, trace, mark, before)

    def wait(self, outcome: Outcome, predicate: Callable[[ProvisioningTrace], bool],
             timeout: float = TRACE_WAIT_S) -> ProvisioningTrace:
        """The outcome's trace once ``predicate`` holds (or after ``timeout``)."""
        return self.trace_until(outcome.inputs.client_id, outcome.mark, predicate, timeout)


@pytest.fixture
def provision(request: pytest.FixtureRequest, device_factory: Any, watch: Watch,
              registry: Registry) -> Provision:
    return Provision(device_factory, watch, registry, request.node)


@pytest.fixture
def connect_as(endpoint_params: EndpointParams) -> Iterator[Callable[..., MqttTransport]]:
    """``connect_as(cert, key, client_id)``: a raw MQTT 3.1.1 connection with those
    credentials (what a device's firmware does below the provisioning client); closed
    after the test."""
    opened: list[MqttTransport] = []

    def connect(cert: Path, key: Path, client_id: str) -> MqttTransport:
        transport = MqttTransport(client_id, endpoint_params,
                                  TlsIdentity.for_endpoint(endpoint_params, cert, key))
        opened.append(transport)
        transport.connect(timeout=10.0)
        return transport

    yield connect
    for transport in opened:
        transport.abort()


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ThingState:
    """A thing as DescribeThing and its list operations show it."""

    name: str
    attributes: Mapping[str, str]
    thing_type: str | None
    billing_group: str | None
    groups: frozenset[str]
    certificates: frozenset[str]


@dataclass(frozen=True)
class CertificateState:
    certificate_id: str
    arn: str
    status: str
    policies: frozenset[str]
    things: frozenset[str]


def _is_not_found(exc: BaseException) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code == "ResourceNotFoundException"


class Registry:
    """What the endpoint holds, through boto3 ``iot`` reads only (AWS or emulator)."""

    def __init__(self, iot: Any) -> None:
        self.iot = iot

    def thing(self, name: str) -> ThingState | None:
        try:
            desc = self.iot.describe_thing(thingName=name)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        groups = frozenset(g["groupName"] for g in self._pages(
            "list_thing_groups_for_thing", "thingGroups", thingName=name))
        principals = frozenset(arn.rsplit("/", 1)[-1] for arn in self._pages(
            "list_thing_principals", "principals", thingName=name))
        return ThingState(name=name, attributes=dict(desc.get("attributes") or {}),
                          thing_type=desc.get("thingTypeName"),
                          billing_group=desc.get("billingGroupName"), groups=groups,
                          certificates=principals)

    def certificate(self, certificate_id: str) -> CertificateState | None:
        try:
            desc = self.iot.describe_certificate(
                certificateId=certificate_id)["certificateDescription"]
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        arn = desc["certificateArn"]
        policies = frozenset(p["policyName"] for p in self._pages(
            "list_attached_policies", "policies", target=arn))
        things = frozenset(self._pages("list_principal_things", "things", principal=arn))
        return CertificateState(certificate_id, arn, desc["status"], policies, things)

    def policy_document(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.iot.get_policy(policyName=name)["policyDocument"]))

    def policy_names(self) -> frozenset[str]:
        return frozenset(p["policyName"] for p in self._pages("list_policies", "policies"))

    def _pages(self, operation: str, key: str, **kwargs: Any) -> Iterator[Any]:
        for page in self.iot.get_paginator(operation).paginate(**kwargs):
            yield from page.get(key, [])

    def assert_left_nothing(self, outcome: Outcome, *, thing_name: str | None) -> None:
        """A refused device left no thing, no usable certificate and no policy: its
        certificates are gone or not ACTIVE, attached to nothing (spec fleet §1.4: one
        transaction; §1.6: unused certificates wait for the token's hour)."""
        if thing_name is not None:
            assert self.thing(thing_name) is None, f"thing {thing_name} was left behind"
        for certificate_id in outcome.created_certificates:
            cert = self.certificate(certificate_id)
            if cert is None:
                continue
            assert cert.status != "ACTIVE", f"certificate {certificate_id} is ACTIVE"
            assert not cert.policies, f"certificate {certificate_id} has {set(cert.policies)}"
            assert not cert.things, f"certificate {certificate_id} is on {set(cert.things)}"
        if outcome.policies_before is not None:
            markers = [m for m in (thing_name, outcome.inputs.serial) if m]
            for name in self.policy_names() - outcome.policies_before:
                text = json.dumps(self.policy_document(name))
                assert not any(m in text for m in markers), f"policy {name} was left behind"


@pytest.fixture(scope="session")
def registry(endpoint: Endpoint) -> Registry:
    return Registry(endpoint.iot)


# --------------------------------------------------------------------------- more fleets


_FLEET_NUMBERS = itertools.count(1)
Body = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]
#: Suffix of the named device policy :class:`FleetMaker` can create for a fleet's template.
DEVICE_POLICY_SUFFIX = "device"


def device_policy_name(prefix: str) -> str:
    """The named IoT policy templates of ``make_fleet(..., device_policy=True)`` refer to."""
    return f"{prefix}-{DEVICE_POLICY_SUFFIX}"


def device_policy_document(prefix: str) -> dict[str, Any]:
    """Connect as any ``<prefix>-...`` client id; publish, subscribe and receive under
    ``dt/<own thing name>/`` (the thing policy variable resolves because a device connects
    with its thing name as client id, spec broker §3.5). Region and account are wildcards
    (spec broker §3.3), so the document fits any endpoint."""
    arn = "arn:aws:iot:*:*:"
    own = "${iot:Connection.Thing.ThingName}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{arn}client/{prefix}-*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": f"{arn}topic/dt/{own}/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": f"{arn}topicfilter/dt/{own}/*"},
        ],
    }


#: The new certificate, ACTIVE (spec fleet §3.2: the only form fleet provisioning uses).
CERTIFICATE_RESOURCE: Mapping[str, Any] = {"Type": "AWS::IoT::Certificate", "Properties": {
    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}}
SERIAL: Mapping[str, Any] = {"Ref": "SerialNumber"}


def template(prefix: str, thing: Mapping[str, Any], *,
             parameters: Mapping[str, Any] | None = None,
             overrides: Mapping[str, str] | None = None,
             mappings: Mapping[str, Any] | None = None,
             configuration: Mapping[str, Any] | None = None,
             policies: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A fleet provisioning template for ``make_fleet``: ``thing`` properties (``ThingName``
    defaults to ``<prefix>-<SerialNumber>``), the new certificate ACTIVE, and the fleet's
    named device policy (or ``policies``: logical name -> policy properties)."""
    properties = {"ThingName": {"Fn::Join": ["-", [prefix, SERIAL]]}, **thing}
    thing_resource: dict[str, Any] = {"Type": "AWS::IoT::Thing", "Properties": properties}
    if overrides:
        thing_resource["OverrideSettings"] = dict(overrides)
    resources: dict[str, Any] = {"thing": thing_resource, "certificate": CERTIFICATE_RESOURCE}
    named = {"policy": {"PolicyName": device_policy_name(prefix)}}
    for name, props in (policies or named).items():
        resources[name] = {"Type": "AWS::IoT::Policy", "Properties": props}
    body: dict[str, Any] = {
        "Parameters": {"SerialNumber": {"Type": "String"}, **(parameters or {})},
        "Resources": resources,
    }
    if mappings:
        body["Mappings"] = dict(mappings)
    if configuration:
        body["DeviceConfiguration"] = dict(configuration)
    return body


class FleetMaker:
    """Fleets with their own templates, named ``<run prefix>-f<n>``, removed by :meth:`close`.

    ``body`` is a template body or a function of the fleet's prefix returning one (name
    things ``<prefix>-...`` so teardown finds them). The claim policy of each fleet allows
    its own template only, as AWS's guide writes it (spec fleet §2.3). With
    ``device_policy=True`` the named policy :func:`device_policy_name` is created first
    (:func:`device_policy_document`, or the document a given function of the prefix
    returns), for templates that attach a policy by name.
    """

    def __init__(self, endpoint: Endpoint, base: Fleet, workdir: Path) -> None:
        self.endpoint = endpoint
        self.base = base
        self.workdir = workdir
        self.fleets: list[tuple[Fleet, Mark | None]] = []

    def __call__(self, body: Body | None = None, *,
                 device_policy: bool | Callable[[str], Mapping[str, Any]] = False,
                 **spec: Any) -> Fleet:
        prefix = f"{self.base.prefix}-f{next(_FLEET_NUMBERS)}"
        made_body = body(prefix) if callable(body) else body
        fleet_spec = FleetSpec(prefix=prefix, template_body=made_body, template_suffix="t",
                               role_arn=self.base.role_arn, workdir=self.workdir / prefix,
                               **spec)
        fleet = Fleet.for_endpoint(self.endpoint, fleet_spec)
        mark = (self.endpoint.observer.mark() if self.endpoint.supports_emulator_extensions
                else None)
        self.fleets.append((fleet, mark))  # from here on, close() removes what it made
        if device_policy:
            document = (device_policy if callable(device_policy) else device_policy_document)
            self.endpoint.iot.create_policy(policyName=device_policy_name(prefix),
                                            policyDocument=json.dumps(document(prefix)))
        fleet.setup()
        return fleet

    def close(self) -> None:
        for fleet, mark in reversed(self.fleets):
            if mark is not None:
                self._track_unregistered(fleet, mark)
            report = fleet.teardown()
            kinds = {left.resource.kind for left in report.leftovers}
            clock = self.endpoint.clock
            if kinds == {ResourceKind.THING_TYPE} and clock is not None:
                # spec broker §5.4: a thing type can go only 5 minutes after deprecation
                clock.advance(THING_TYPE_DELETE_DELAY_S + 1)
                report = cleanup_prefix(self.endpoint.iot, fleet.prefix)
            if not report.ok:
                warnings.warn(FleetbenchLeftoverWarning(report.summary()), stacklevel=1)
        self.fleets.clear()

    def _track_unregistered(self, fleet: Fleet, mark: Mark) -> None:
        """Certificates its devices made but never registered lead nowhere by name."""
        claims = set(fleet.claim_certificate_ids)
        for event in self.endpoint.observer.events(since=mark):
            if event.kind == Kind.CERTIFICATE_CREATED.value and event.certificate_id \
                    and event.detail.get("claimCertificateId") in claims:
                fleet.track_certificate(event.certificate_id)


@pytest.fixture
def make_fleet(endpoint: Endpoint, fleet: Fleet, tmp_path: Path) -> Iterator[FleetMaker]:
    maker = FleetMaker(endpoint, fleet, tmp_path / "fleets")
    try:
        yield maker
    finally:
        maker.close()


# --------------------------------------------------------------------------- hooks


@dataclass
class HookArns:
    """``hook_arn("deny")``: a Lambda ARN the emulator maps to ``scenarios.hooks.deny``."""

    endpoint: Any
    mapped: dict[str, str] = field(default_factory=dict)

    def __call__(self, function: str) -> str:
        from scenarios import hooks

        if not callable(getattr(hooks, function, None)):
            raise ValueError(f"scenarios/hooks.py has no function {function!r}")
        arn = (f"arn:aws:lambda:{self.endpoint.region}:{self.endpoint.account_id}:"
               f"function:fleetbench-scenario-{function}")
        if arn not in self.mapped:
            admin = self.endpoint.admin
            admin.set_hooks({**admin.hooks(), arn: f"python:{HOOKS_MODULE}:{function}"})
            self.mapped[arn] = function
        return arn


@pytest.fixture(scope="session")
def hook_arn(endpoint: Endpoint) -> HookArns:
    """Hook targets are functions the emulator imports; only a local emulator can."""
    if endpoint.kind is not EndpointKind.LOCAL:
        pytest.skip(f"hook scenarios map Lambda ARNs to {HOOKS_MODULE} functions, which only "
                    f"a local emulator can import (endpoint is {endpoint.kind.value})")
    return HookArns(endpoint)
