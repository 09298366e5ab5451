"""The control plane against real boto3, the real AWS CLI and raw HTTP.

The backend here is a small in-test registry (dicts behind a lock); the real
registry gets its own integration tests. Spec: iot-broker-and-policy.md §5.1-§5.4,
§7 items 17-21; fleet-provisioning.md §6.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any
from urllib.parse import quote

import boto3
import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import errors
from harness.emulator.controlplane import (
    BackgroundServer,
    build_app,
    exposure_requires_token,
    iot_routes,
)
from harness.emulator.registry.paging import ordered, paginate

REGION = "us-east-1"
ACCOUNT = "123456789012"
TOKEN = "s3cret-token"
NO_RETRIES = Config(retries={"total_max_attempts": 1})


# --------------------------------------------------------------------------- in-test backend


class Status(str, Enum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


@dataclass(frozen=True)
class Thing:
    thing_name: str
    thing_id: str
    thing_arn: str
    attributes: dict[str, str] = field(default_factory=dict)
    thing_type_name: str | None = None
    version: int = 1


@dataclass(frozen=True)
class CertificateDescription:
    certificate_id: str
    certificate_arn: str
    status: Status
    creation_date: dt.datetime


class Backend:
    """One method per operation, as the real registry has."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.things: dict[str, Thing] = {}
        self.principals: dict[str, set[str]] = {}
        self.certificates: dict[str, CertificateDescription] = {}
        self.attached: dict[str, list[str]] = {}
        self.templates: dict[str, bool] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _log(self, name: str, **kwargs: Any) -> None:
        with self.lock:
            self.calls.append((name, kwargs))

    def last(self, name: str) -> dict[str, Any]:
        with self.lock:
            return next(kw for op, kw in reversed(self.calls) if op == name)

    def count(self, name: str) -> int:
        with self.lock:
            return sum(1 for op, _ in self.calls if op == name)

    # things (spec §5.3, §5.4)
    def create_thing(self, thing_name: str, attribute_payload: dict | None = None,
                     thing_type_name: str | None = None, **_: Any) -> dict[str, str]:
        attributes = dict((attribute_payload or {}).get("attributes", {}))
        with self.lock:
            existing = self.things.get(thing_name)
            if existing is not None:
                if existing.attributes != attributes:
                    raise errors.ResourceAlreadyExistsException(
                        f"Thing {thing_name} already exists with different attributes",
                        resourceId=existing.thing_id, resourceArn=existing.thing_arn)
                thing = existing
            else:
                thing = Thing(thing_name, str(uuid.uuid4()),
                              f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing_name}",
                              attributes, thing_type_name)
                self.things[thing_name] = thing
        return {"thingName": thing.thing_name, "thing_arn": thing.thing_arn,
                "thing_id": thing.thing_id}

    def describe_thing(self, thing_name: str) -> Thing:
        with self.lock:
            if thing_name not in self.things:
                raise errors.ResourceNotFoundException(f"Thing {thing_name} cannot be found.")
            return self.things[thing_name]

    def update_thing(self, thing_name: str, expected_version: int | None = None,
                     attribute_payload: dict | None = None, **_: Any) -> None:
        thing = self.describe_thing(thing_name)
        with self.lock:
            if expected_version is not None and expected_version != thing.version:
                raise errors.VersionConflictException(
                    f"The version for thing {thing_name} does not match the expected version.")
            attributes = dict((attribute_payload or {}).get("attributes", {}))
            self.things[thing_name] = replace(thing, attributes=attributes,
                                              version=thing.version + 1)

    def delete_thing(self, thing_name: str, expected_version: int | None = None) -> None:
        self._log("delete_thing", thing_name=thing_name, expected_version=expected_version)
        with self.lock:
            if self.principals.get(thing_name):
                raise errors.InvalidRequestException(
                    f"Cannot delete. Thing {thing_name} is still attached to one or more "
                    "principals")
            self.things.pop(thing_name, None)

    def list_things(self, next_token: str | None = None, max_results: int | None = None,
                    **filters: Any) -> dict[str, Any]:
        self._log("list_things", next_token=next_token, max_results=max_results, **filters)
        with self.lock:
            things = sorted(self.things.values(), key=lambda t: t.thing_name)
        prefix = filters.get("thing_type_name")
        if prefix:
            things = [t for t in things if t.thing_type_name == prefix]
        page, token = paginate(ordered(things, lambda t: (t.thing_name,)), next_token,
                               max_results or 3)
        return {"things": page, "next_token": token}

    def attach_thing_principal(self, thing_name: str, principal: str,
                               thing_principal_type: str | None = None) -> None:
        self._log("attach_thing_principal", thing_name=thing_name, principal=principal,
                  thing_principal_type=thing_principal_type)
        with self.lock:
            self.principals.setdefault(thing_name, set()).add(principal)

    # certificates
    def describe_certificate(self, certificate_id: str) -> dict[str, Any]:
        with self.lock:
            cert = self.certificates.get(certificate_id)
        if cert is None:
            raise errors.ResourceNotFoundException(f"Certificate {certificate_id} not found")
        return {"certificate_description": cert}

    def delete_certificate(self, certificate_id: str, force_delete: bool = False) -> None:
        self._log("delete_certificate", certificate_id=certificate_id, force_delete=force_delete)
        with self.lock:
            cert = self.certificates.get(certificate_id)
            if cert is not None and cert.status is Status.ACTIVE:
                raise errors.CertificateStateException(
                    "Certificate must be deactivated (not ACTIVE) before deletion. "
                    f"Id: {certificate_id}")
            self.certificates.pop(certificate_id, None)

    # policies
    def list_attached_policies(self, target: str, **kwargs: Any) -> dict[str, Any]:
        self._log("list_attached_policies", target=target, **kwargs)
        names = self.attached.get(target, [])
        return {"policies": [{"policy_name": n, "policyArn": f"arn:aws:iot:{REGION}:"
                              f"{ACCOUNT}:policy/{n}"} for n in names]}

    def delete_policy(self, policy_name: str) -> None:
        if any(policy_name in names for names in self.attached.values()):
            raise errors.DeleteConflictException(
                "The policy cannot be deleted as the policy is attached to one or more "
                f"principals (name={policy_name})")

    # provisioning templates (fleet-provisioning.md §6)
    def update_provisioning_template(self, template_name: str, **_: Any) -> None:
        if self.templates.get(template_name):
            raise errors.ConflictingResourceUpdateException(
                f"Template {template_name} is being updated by another request")

    # throttled and failing operations
    def describe_endpoint(self, endpoint_type: str | None = None) -> dict[str, str]:
        self._log("describe_endpoint", endpoint_type=endpoint_type)
        raise errors.ThrottlingException("Rate exceeded")

    def get_registration_code(self) -> dict[str, str]:
        raise RuntimeError("boom: private detail that must not leak")


def _certificate(backend: Backend, status: Status) -> str:
    cert_id = uuid.uuid4().hex * 2
    backend.certificates[cert_id] = CertificateDescription(
        cert_id, f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/{cert_id}", status,
        dt.datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=dt.timezone.utc))
    return cert_id


# --------------------------------------------------------------------------- fixtures


@dataclass
class Api:
    url: str
    backend: Backend


def _serve(**kwargs: Any) -> Iterator[Api]:
    backend = Backend()
    with ThreadPoolExecutor(2) as executor:
        app = build_app(backend, region=REGION, account_id=ACCOUNT, executor=executor, **kwargs)
        with BackgroundServer(app) as server:
            yield Api(server.url, backend)


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    yield from _serve()


@pytest.fixture(scope="module")
def guarded() -> Iterator[Api]:
    yield from _serve(api_token=TOKEN, key_pairs={"AKIDFLEET": "pair-secret"})


def _client(url: str, *, key: str = "x", secret: str = "y", config: Config = NO_RETRIES) -> Any:
    return boto3.client("iot", endpoint_url=url, region_name=REGION,
                        aws_access_key_id=key, aws_secret_access_key=secret, config=config)


@pytest.fixture(scope="module")
def iot(api: Api) -> Any:
    return _client(api.url)


def _name() -> str:
    return f"thing-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Raw:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Raw:
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return Raw(response.status, dict(response.headers), json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return Raw(exc.code, dict(exc.headers), json.loads(exc.read()))


# --------------------------------------------------------------------------- success paths


def test_created_thing_is_described_with_its_attributes(iot: Any) -> None:
    # spec broker §5.3 (Things): CreateThing / DescribeThing shapes
    name = _name()
    created = iot.create_thing(thingName=name, attributePayload={"attributes": {"serial": "42"}})
    assert created["thingName"] == name
    assert created["thingArn"].endswith(f":thing/{name}")
    described = iot.describe_thing(thingName=name)
    assert described["thingId"] == created["thingId"]
    assert described["attributes"] == {"serial": "42"}
    assert described["version"] == 1
    assert "thingTypeName" not in described  # None is omitted
    assert described["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]


def test_list_things_pages_with_next_token_until_the_last_page(api: Api) -> None:
    # spec broker §5.1 / §7 item 21: nextToken + maxResults pagination
    iot = _client(api.url)
    kind = f"type-{uuid.uuid4().hex[:8]}"
    names = sorted(_name() for _ in range(5))
    for name in names:
        api.backend.create_thing(thing_name=name, thing_type_name=kind)
    first = iot.list_things(thingTypeName=kind, maxResults=2)
    assert [t["thingName"] for t in first["things"]] == names[:2]
    assert first["nextToken"]
    pages = iot.get_paginator("list_things").paginate(
        thingTypeName=kind, PaginationConfig={"PageSize": 2})
    seen = [t["thingName"] for page in pages for t in page["things"]]
    assert seen == names
    last = iot.list_things(thingTypeName=kind, maxResults=5)
    assert "nextToken" not in last
    assert api.backend.last("list_things")["max_results"] == 5


def test_arn_in_a_uri_label_arrives_decoded_as_one_segment(api: Api, iot: Any) -> None:
    # spec broker §5.1 and §7 item 18: %2F and %3A inside a label stay part of it
    target = f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/{uuid.uuid4().hex}"
    api.backend.attached[target] = ["DevicePolicy"]
    answer = iot.list_attached_policies(target=target, recursive=True, pageSize=10)
    assert answer["policies"] == [
        {"policyName": "DevicePolicy", "policyArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:policy/"
                                                    "DevicePolicy"}]
    received = api.backend.last("list_attached_policies")
    assert received["target"] == target
    assert received["recursive"] is True and received["page_size"] == 10


def test_thing_principal_travels_in_the_x_amzn_principal_header(api: Api, iot: Any) -> None:
    # spec broker §5.3 AttachThingPrincipal and §7 item 19
    name = _name()
    principal = f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/{'ab' * 32}"
    iot.attach_thing_principal(thingName=name, principal=principal,
                               thingPrincipalType="EXCLUSIVE_THING")
    assert api.backend.last("attach_thing_principal") == {
        "thing_name": name, "principal": principal, "thing_principal_type": "EXCLUSIVE_THING"}


def test_query_booleans_and_integers_reach_the_backend_typed(api: Api, iot: Any) -> None:
    # spec broker §5.1: booleans in query strings are true/false
    cert_id = _certificate(api.backend, Status.INACTIVE)
    iot.delete_certificate(certificateId=cert_id, forceDelete=True)
    assert api.backend.last("delete_certificate")["force_delete"] is True
    iot.delete_thing(thingName=_name(), expectedVersion=7)
    assert api.backend.last("delete_thing")["expected_version"] == 7


def test_timestamps_are_epoch_seconds_and_enums_their_value(api: Api) -> None:
    # spec broker §5.1: timestamps are JSON numbers of epoch seconds
    cert_id = _certificate(api.backend, Status.ACTIVE)
    raw = _raw(api.url, "GET", f"/certificates/{cert_id}")
    description = raw.body["certificateDescription"]
    assert description["creationDate"] == 1714564800.5
    assert description["status"] == "ACTIVE"
    parsed = _client(api.url).describe_certificate(certificateId=cert_id)
    assert parsed["certificateDescription"]["creationDate"] == dt.datetime(
        2024, 5, 1, 12, 0, 0, 500000, tzinfo=dt.timezone.utc).astimezone(
        parsed["certificateDescription"]["creationDate"].tzinfo)


def test_successful_delete_is_200_with_an_empty_object(api: Api) -> None:
    # spec broker §5.1: all successes are 200, empty output {}
    raw = _raw(api.url, "DELETE", f"/things/{_name()}")
    assert (raw.status, raw.body) == (200, {})
    assert raw.headers["x-amzn-RequestId"]


# --------------------------------------------------------------------------- modeled errors


def test_missing_thing_raises_resource_not_found(iot: Any) -> None:
    # spec broker §5.2: 404 ResourceNotFoundException
    with pytest.raises(iot.exceptions.ResourceNotFoundException) as caught:
        iot.describe_thing(thingName=_name())
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "cannot be found" in caught.value.response["Error"]["Message"]


def test_recreating_a_thing_differently_raises_already_exists_with_resource_id(iot: Any) -> None:
    # spec broker §5.4 and fleet §6: 409 ResourceAlreadyExistsException carries resourceId/Arn
    name = _name()
    first = iot.create_thing(thingName=name)
    assert iot.create_thing(thingName=name)["thingId"] == first["thingId"]  # identical: idempotent
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException) as caught:
        iot.create_thing(thingName=name, attributePayload={"attributes": {"a": "b"}})
    assert caught.value.response["resourceId"] == first["thingId"]
    assert caught.value.response["resourceArn"] == first["thingArn"]


def test_deleting_a_thing_with_principals_raises_invalid_request(api: Api, iot: Any) -> None:
    # spec broker §5.4 and §7 item 20
    name = _name()
    iot.attach_thing_principal(thingName=name, principal="arn:aws:iot:us-east-1:1:cert/x")
    with pytest.raises(iot.exceptions.InvalidRequestException, match="still attached"):
        iot.delete_thing(thingName=name)


def test_expected_version_mismatch_raises_version_conflict(iot: Any) -> None:
    # spec broker §5.4: expectedVersion mismatch → VersionConflictException
    name = _name()
    iot.create_thing(thingName=name)
    with pytest.raises(iot.exceptions.VersionConflictException):
        iot.update_thing(thingName=name, expectedVersion=5)


def test_deleting_an_active_certificate_raises_certificate_state(api: Api, iot: Any) -> None:
    # spec broker §5.4 and §7 item 20: 406 CertificateStateException
    cert_id = _certificate(api.backend, Status.ACTIVE)
    with pytest.raises(iot.exceptions.CertificateStateException) as caught:
        iot.delete_certificate(certificateId=cert_id)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 406


def test_deleting_an_attached_policy_raises_delete_conflict(api: Api, iot: Any) -> None:
    # spec broker §5.4: attached policy → DeleteConflictException
    api.backend.attached["arn:aws:iot:us-east-1:1:cert/conflict"] = ["Attached"]
    with pytest.raises(iot.exceptions.DeleteConflictException):
        iot.delete_policy(policyName="Attached")


def test_concurrent_template_update_raises_conflicting_resource_update(api: Api,
                                                                       iot: Any) -> None:
    # fleet §6: UpdateProvisioningTemplate → ConflictingResourceUpdateException 409
    api.backend.templates["busy"] = True
    with pytest.raises(iot.exceptions.ConflictingResourceUpdateException):
        iot.update_provisioning_template(templateName="busy", enabled=True)


def test_throttling_is_a_400_that_legacy_boto3_retries(api: Api) -> None:
    # spec broker §5.2 and §7 item 17: ThrottlingException with 400 so legacy mode retries it
    iot = _client(api.url, config=Config(retries={"mode": "legacy", "total_max_attempts": 2}))
    before = api.backend.count("describe_endpoint")
    with pytest.raises(iot.exceptions.ThrottlingException) as caught:
        iot.describe_endpoint(endpointType="iot:Data-ATS")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert api.backend.count("describe_endpoint") - before == 2


def test_error_response_has_aws_error_type_header_and_message_body(api: Api) -> None:
    # spec broker §5.2: x-amzn-ErrorType "<Code>:", x-amzn-RequestId, {"message": ...}
    raw = _raw(api.url, "GET", f"/things/{_name()}")
    assert raw.status == 404
    assert raw.headers["x-amzn-ErrorType"] == "ResourceNotFoundException:"
    assert raw.headers["x-amzn-RequestId"]
    assert set(raw.body) == {"message"}


# --------------------------------------------------------------------------- validation


def test_thing_name_pattern_is_checked_by_the_server(iot: Any) -> None:
    # spec broker §5.1 and §7 item 22: patterns are not checked by boto3
    with pytest.raises(iot.exceptions.InvalidRequestException) as caught:
        iot.describe_thing(thingName="bad name!")
    assert caught.value.response["Error"]["Message"] == (
        "1 validation error detected: Value 'bad name!' at 'thingName' failed to satisfy "
        "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+")


def test_enum_and_maximum_length_violations_are_all_listed(iot: Any) -> None:
    # spec broker §5.1: enums and maximum lengths are server-side checks
    with pytest.raises(iot.exceptions.InvalidRequestException) as caught:
        iot.create_thing(thingName="t" * 129, thingTypeName="bad type")
    message = caught.value.response["Error"]["Message"]
    assert message.startswith("2 validation errors detected: ")
    assert ("at 'thingName' failed to satisfy constraint: Member must have length less than "
            "or equal to 128") in message
    assert "Value 'bad type' at 'thingTypeName'" in message
    with pytest.raises(iot.exceptions.InvalidRequestException,
                       match=r"Member must satisfy enum value set: \[ACTIVE, INACTIVE"):
        iot.update_certificate(certificateId="a" * 64, newStatus="SHINY")


def test_attribute_names_are_checked_inside_the_map(iot: Any) -> None:
    # spec broker §5.4: attribute name set [a-zA-Z0-9_.,@/:#-]+
    with pytest.raises(iot.exceptions.InvalidRequestException) as caught:
        iot.create_thing(thingName=_name(), attributePayload={"attributes": {"bad key": "v"}})
    message = caught.value.response["Error"]["Message"]
    assert "at 'attributePayload.attributes' failed to satisfy constraint: Map keys must " \
           "satisfy constraint: [" in message


def test_values_of_sensitive_members_are_not_echoed(api: Api) -> None:
    # GetThingConnectivityData's thingName is a sensitive shape in the model
    raw = _raw(api.url, "POST", "/things/bad%20name/connectivity-data")
    assert raw.body["message"] == (
        "1 validation error detected: Value at 'thingName' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: [a-zA-Z0-9:_-]+")


def test_missing_required_header_is_refused_when_sent_raw(api: Api) -> None:
    # spec broker §5.1: required members are only checked client-side by boto3
    raw = _raw(api.url, "PUT", f"/things/{_name()}/principals", body=b"")
    assert raw.status == 400
    assert raw.headers["x-amzn-ErrorType"] == "InvalidRequestException:"
    assert raw.body["message"] == ("1 validation error detected: Value null at 'principal' "
                                   "failed to satisfy constraint: Member must not be null")


def test_unparsable_query_boolean_is_an_invalid_request(api: Api) -> None:
    # spec broker §5.1: booleans in query strings are true/false
    raw = _raw(api.url, "GET", "/things?usePrefixAttributeValue=maybe")
    assert raw.status == 400
    assert "'usePrefixAttributeValue'" in raw.body["message"]


def test_unparsable_integer_label_is_one_type_error(api: Api) -> None:
    raw = _raw(api.url, "GET", "/provisioning-templates/t/versions/abc")
    assert raw.status == 400
    assert raw.body["message"] == (
        "1 validation error detected: Value 'abc' at 'versionId' failed to satisfy constraint: "
        "Member must be of type integer")


def test_malformed_json_body_is_an_invalid_request(api: Api) -> None:
    # spec broker §5.2 (choice documented in controlplane.py)
    raw = _raw(api.url, "POST", f"/things/{_name()}", body=b'{"attributePayload": ',
               headers={"Content-Type": "application/json"})
    assert raw.status == 400
    assert raw.headers["x-amzn-ErrorType"] == "InvalidRequestException:"
    assert raw.body["message"].startswith("Could not parse request body into json")


# --------------------------------------------------------------- unrouted / unimplemented


def test_path_with_no_operation_is_404_unknown_operation(api: Api) -> None:
    raw = _raw(api.url, "GET", "/no-such-resource/x")
    assert raw.status == 404
    assert raw.headers["x-amzn-ErrorType"] == "UnknownOperationException:"
    assert "GET /no-such-resource/x" in raw.body["message"]


def test_operation_the_backend_lacks_is_501_naming_it(iot: Any) -> None:
    with pytest.raises(ClientError) as caught:
        iot.list_thing_types()
    error = caught.value.response["Error"]
    assert error["Code"] == "NotImplementedException"
    assert "ListThingTypes" in error["Message"]
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501


def test_backend_crash_is_a_500_without_details(api: Api) -> None:
    # spec broker §5.2: InternalFailureException 500; nothing internal leaks
    raw = _raw(api.url, "GET", "/registrationcode")
    assert raw.status == 500
    assert raw.headers["x-amzn-ErrorType"] == "InternalFailureException:"
    assert "boom" not in json.dumps(raw.body) and "Traceback" not in json.dumps(raw.body)


# --------------------------------------------------------------------------- authentication


def test_token_as_secret_key_signs_requests_with_any_access_key(guarded: Api) -> None:
    iot = _client(guarded.url, key="ANYKEYID", secret=TOKEN)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_thing(thingName=_name())  # authenticated: reached the backend
    name = _name()
    iot.create_thing(thingName=name, attributePayload={"attributes": {"k": "v"}})
    target = "arn:aws:iot:us-east-1:1:cert/with/slash"
    assert iot.list_attached_policies(target=target)["policies"] == []


def test_configured_key_pair_signs_requests(guarded: Api) -> None:
    iot = _client(guarded.url, key="AKIDFLEET", secret="pair-secret")
    assert "things" in iot.list_things(maxResults=1)


def test_wrong_secret_is_refused_with_invalid_signature(guarded: Api) -> None:
    for key, secret in (("ANYKEYID", "not-the-token"), ("AKIDFLEET", TOKEN)):
        with pytest.raises(ClientError) as caught:
            _client(guarded.url, key=key, secret=secret).list_things()
        assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unsigned_request_is_refused(guarded: Api) -> None:
    iot = boto3.client("iot", endpoint_url=guarded.url, region_name=REGION,
                       config=Config(signature_version=botocore.UNSIGNED,
                                     retries={"total_max_attempts": 1}))
    with pytest.raises(ClientError) as caught:
        iot.list_things()
    assert caught.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_token_header_is_accepted_and_a_wrong_one_refused(guarded: Api) -> None:
    ok = _raw(guarded.url, "GET", "/things", headers={"x-fleetbench-api-token": TOKEN})
    assert ok.status == 200
    bad = _raw(guarded.url, "GET", "/things", headers={"x-fleetbench-api-token": "guess"})
    assert bad.status == 403
    assert bad.headers["x-amzn-ErrorType"] == "UnrecognizedClientException:"
    assert bad.body["message"] == "The security token included in the request is invalid."


def test_signature_for_another_region_is_refused(guarded: Api) -> None:
    iot = boto3.client("iot", endpoint_url=guarded.url, region_name="eu-west-1",
                       aws_access_key_id="k", aws_secret_access_key=TOKEN, config=NO_RETRIES)
    with pytest.raises(ClientError, match="scoped to a valid region"):
        iot.list_things()


@pytest.mark.parametrize(("host", "exposed"), [
    ("127.0.0.1", False), ("::1", False), ("localhost", False),
    ("0.0.0.0", True), ("::", True), ("", True), ("10.1.2.3", True), ("bench.lan", True)])
def test_binding_beyond_loopback_calls_for_a_token(host: str, exposed: bool) -> None:
    assert exposure_requires_token(host) is exposed


def test_without_a_token_any_credentials_are_accepted(api: Api) -> None:
    assert "things" in _client(api.url, key="whoever", secret="whatever").list_things()
    assert _raw(api.url, "GET", "/things").status == 200


# --------------------------------------------------------------------------- AWS CLI


def test_aws_cli_describe_thing(api: Api) -> None:
    # design principle 1: the AWS CLI is a conformance client.
    # awscli v1 (installed) has no --no-cli-pager; AWS_PAGER="" does the same for v2.
    name = _name()
    api.backend.create_thing(thing_name=name, attribute_payload={"attributes": {"a": "1"}})
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_DEFAULT_REGION": REGION, "AWS_PAGER": "", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    done = subprocess.run(
        [sys.executable, "-m", "awscli", "iot", "describe-thing", "--thing-name", name,
         "--endpoint-url", api.url, "--output", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["attributes"] == {"a": "1"}


# --------------------------------------------------------------------------- properties


_LABEL_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(_LABEL_TEXT)
def test_any_percent_encoded_label_decodes_to_itself(text: str) -> None:
    # spec broker §5.1: labels encoded with nothing but -_.~ left; decode as one segment
    found = iot_routes().match("POST", "/attached-policies/" + quote(text, safe="-_.~"), [])
    assert found is not None
    assert found.route.operation == "ListAttachedPolicies"
    assert found.labels == {"target": text}
