"""The provisioning setup a run needs, made and removed through the control plane only.

:class:`Fleet` creates, from a :class:`FleetSpec`, the provisioning role (given, or
created with IAM), the thing types, thing groups and billing groups the template uses,
the provisioning template (with an optional pre-provisioning hook) and the claim policy;
it then hands out claim certificates (:meth:`Fleet.create_claim`) and trusted-user claims
(:meth:`Fleet.create_trusted_user_claim`). Everything carries the run prefix, including
the things devices get from the default template, so :meth:`Fleet.teardown` (and
``fleetbench cleanup --prefix P`` after a crash) finds and removes it all in AWS's order
(:mod:`harness.teardown`). Only boto3 calls are used, so the same code prepares the
emulator and a real account (design principle 1).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from devices.base import ClaimCredentials
from harness import pki
from harness.protocol import POLICY_VERSION, claim_policy_document
from harness.teardown import CleanupReport, Teardown, cleanup_prefix

__all__ = [
    "DEFAULT_HOOK_PAYLOAD_VERSION",
    "SERIAL_PARAMETER",
    "ClaimCredentials",
    "ClaimPolicyVariant",
    "CleanupReport",
    "Fleet",
    "FleetSpec",
    "cleanup_prefix",
    "demo_template_body",
]

log = logging.getLogger("fleetbench.fleet")

#: The parameter the default template names things after.
SERIAL_PARAMETER = "SerialNumber"
#: ``preProvisioningHook.payloadVersion`` (the only version AWS documents).
DEFAULT_HOOK_PAYLOAD_VERSION = "2020-04-01"
#: AWS's managed policy for provisioning roles (spec fleet §2.3).
THINGS_REGISTRATION_POLICY_ARN = \
    "arn:aws:iam::aws:policy/service-role/AWSIoTThingsRegistration"
#: How long a freshly created IAM role may take before IoT can assume it.
ROLE_PROPAGATION_TIMEOUT_S = 60.0
#: Template names: 1-36 of ``[0-9A-Za-z_-]`` (spec fleet §5).
TEMPLATE_NAME_RE = re.compile(r"^[0-9A-Za-z_-]{1,36}$")


class ClaimPolicyVariant(str, Enum):
    """Which certificate API the claim policy allows (spec fleet §2.3, edge case 12)."""

    KEYS = "keys"
    CSR = "csr"
    BOTH = "both"


def demo_template_body(prefix: str, *, region: str, account_id: str,
                       thing_groups: tuple[str, ...] = (), thing_type: str | None = None,
                       billing_group: str | None = None) -> dict[str, Any]:
    """The default template: thing ``<prefix>-<SerialNumber>`` with attributes, the new
    certificate ACTIVE, and an inline device policy.

    The device policy lets the device connect with its thing name as client id and
    publish, subscribe and receive under ``device/<thingName>/...`` and
    ``dt/${iot:Connection.Thing.ThingName}/...`` (the policy variable resolves because
    the client id is the thing name, spec broker §3.5). Group, type and billing group
    names are used as given (already prefixed).
    """
    arn = f"arn:aws:iot:{region}:{account_id}:"
    serial = {"Ref": SERIAL_PARAMETER}

    def per_thing(resource: str, suffix: str = "") -> dict[str, Any]:
        return {"Fn::Join": ["", [f"{arn}{resource}{prefix}-", serial, suffix]]}

    variable_thing = "${iot:Connection.Thing.ThingName}"
    policy = {
        "Version": POLICY_VERSION,
        "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": [per_thing("client/")]},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": [per_thing("topic/device/", "/*"),
                          f"{arn}topic/dt/{variable_thing}/*"]},
            {"Effect": "Allow", "Action": ["iot:Subscribe"],
             "Resource": [per_thing("topicfilter/device/", "/*"),
                          f"{arn}topicfilter/dt/{variable_thing}/*"]},
        ],
    }
    thing: dict[str, Any] = {
        "ThingName": {"Fn::Join": ["", [f"{prefix}-", serial]]},
        "AttributePayload": {"serial": serial, "fleetbench_run": prefix},
    }
    if thing_groups:
        thing["ThingGroups"] = list(thing_groups)
    if thing_type:
        thing["ThingTypeName"] = thing_type
    if billing_group:
        thing["BillingGroup"] = billing_group
    return {
        "Parameters": {
            SERIAL_PARAMETER: {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"},
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": thing,
                "OverrideSettings": {"AttributePayload": "MERGE", "ThingTypeName": "REPLACE",
                                     "ThingGroups": "DO_NOTHING"},
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                               "Status": "ACTIVE"},
            },
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": policy}},
        },
        "DeviceConfiguration": {
            "fleetbenchRun": prefix,
            "telemetryTopic": {"Fn::Join": ["", [f"dt/{prefix}-", serial, "/telemetry"]]},
        },
    }


@dataclass(frozen=True)
class FleetSpec:
    """What a run's provisioning setup consists of.

    Names in ``thing_groups``/``thing_types``/``billing_groups`` are given without the
    prefix; the fleet creates ``<prefix>-<name>``. ``template_body`` (a mapping or JSON
    text) replaces the default :func:`demo_template_body`; it should name things with
    the prefix too, or teardown cannot find them. ``role_arn`` is used as given; with
    ``create_role`` the role is created with IAM (AWS) and removed at teardown; with
    neither, a placeholder ARN is used (the emulator does not assume roles).
    """

    prefix: str
    template_body: Mapping[str, Any] | str | None = None
    template_suffix: str = "template"
    description: str = "fleetbench run"
    hook_arn: str | None = None
    hook_payload_version: str = DEFAULT_HOOK_PAYLOAD_VERSION
    enabled: bool = True
    role_arn: str | None = None
    create_role: bool = False
    thing_groups: tuple[str, ...] = ()
    thing_types: tuple[str, ...] = ()
    billing_groups: tuple[str, ...] = ()
    claim_policy: ClaimPolicyVariant = ClaimPolicyVariant.BOTH
    workdir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "claim_policy", ClaimPolicyVariant(self.claim_policy))
        for field_name in ("thing_groups", "thing_types", "billing_groups"):
            object.__setattr__(self, field_name, tuple(getattr(self, field_name)))
        if not re.fullmatch(r"[0-9A-Za-z_-]+", self.prefix or ""):
            raise ValueError(f"run prefix must match [0-9A-Za-z_-]+, got {self.prefix!r}")
        if not TEMPLATE_NAME_RE.match(self.template_name):
            raise ValueError(f"template name {self.template_name!r} is not 1-36 characters of "
                             "[0-9A-Za-z_-]; shorten the prefix or template_suffix")

    @property
    def template_name(self) -> str:
        return f"{self.prefix}-{self.template_suffix}"

    def name(self, suffix: str) -> str:
        """A resource name that carries the run prefix."""
        return f"{self.prefix}-{suffix}"


class Fleet:
    """A run's provisioning setup on one endpoint: :meth:`setup`, use, :meth:`teardown`."""

    def __init__(self, iot: Any, spec: FleetSpec, *, region: str, account_id: str,
                 iam: Any = None, retry_timeout: float = 30.0) -> None:
        self.iot = iot
        self.iam = iam
        self.spec = spec
        self.region = region
        self.account_id = account_id
        self.retry_timeout = retry_timeout
        self._owns_workdir = spec.workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fleetbench-{spec.prefix}-")) \
            if spec.workdir is None else Path(spec.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.template_arn: str | None = None
        self.role_arn = spec.role_arn or \
            f"arn:aws:iam::{account_id}:role/{spec.name('provisioning')}"
        self._created_role: str | None = None
        self._lock = threading.Lock()
        self._certificates: list[str] = []
        self._claim_ids: list[str] = []
        self._claims = 0
        self._torn_down: CleanupReport | None = None

    @classmethod
    def for_endpoint(cls, endpoint: Any, spec: FleetSpec) -> Fleet:
        """A fleet on ``endpoint`` (its ``iot`` client, region, account; IAM if it must create
        the role)."""
        iam = endpoint.client("iam") if spec.create_role else None
        return cls(endpoint.iot, spec, region=endpoint.region, account_id=endpoint.account_id,
                   iam=iam)

    # -- names --------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self.spec.prefix

    @property
    def template_name(self) -> str:
        return self.spec.template_name

    @property
    def claim_policy_name(self) -> str:
        return self.spec.name("claim")

    def thing_name(self, serial: str) -> str:
        """The thing the default template registers for ``serial``."""
        return f"{self.prefix}-{serial}"

    @property
    def thing_groups(self) -> tuple[str, ...]:
        return tuple(self.spec.name(g) for g in self.spec.thing_groups)

    @property
    def thing_types(self) -> tuple[str, ...]:
        return tuple(self.spec.name(t) for t in self.spec.thing_types)

    @property
    def billing_groups(self) -> tuple[str, ...]:
        return tuple(self.spec.name(b) for b in self.spec.billing_groups)

    def template_body(self) -> str:
        body = self.spec.template_body
        if body is None:
            body = demo_template_body(
                self.prefix, region=self.region, account_id=self.account_id,
                thing_groups=self.thing_groups,
                thing_type=self.thing_types[0] if self.thing_types else None,
                billing_group=self.billing_groups[0] if self.billing_groups else None)
        return body if isinstance(body, str) else json.dumps(body)

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> Fleet:
        """Create everything; on failure remove what was made and re-raise."""
        try:
            if self.spec.create_role:
                self._create_role()
            for name in self.thing_types:
                self.iot.create_thing_type(thingTypeName=name, thingTypeProperties={
                    "thingTypeDescription": f"fleetbench run {self.prefix}"})
            for name in self.thing_groups:
                self.iot.create_thing_group(thingGroupName=name)
            for name in self.billing_groups:
                self.iot.create_billing_group(billingGroupName=name)
            self._create_template()
            document = claim_policy_document(
                self.template_name, region=self.region, account_id=self.account_id,
                keys=self.spec.claim_policy is not ClaimPolicyVariant.CSR,
                csr=self.spec.claim_policy is not ClaimPolicyVariant.KEYS)
            self.iot.create_policy(policyName=self.claim_policy_name,
                                   policyDocument=json.dumps(document))
        except BaseException:
            report = self.teardown()
            log.error("event=fleet_setup_failed prefix=%s cleanup=%s", self.prefix,
                      "ok" if report.ok else report.summary())
            raise
        log.info("event=fleet_ready prefix=%s template=%s", self.prefix, self.template_name)
        return self

    def _create_template(self) -> None:
        kwargs: dict[str, Any] = {
            "templateName": self.template_name,
            "description": self.spec.description,
            "templateBody": self.template_body(),
            "enabled": self.spec.enabled,
            "provisioningRoleArn": self.role_arn,
            "type": "FLEET_PROVISIONING",
            "tags": [{"Key": "fleetbench-run", "Value": self.prefix}],
        }
        if self.spec.hook_arn:
            kwargs["preProvisioningHook"] = {"targetArn": self.spec.hook_arn,
                                             "payloadVersion": self.spec.hook_payload_version}
        deadline = time.monotonic() + (ROLE_PROPAGATION_TIMEOUT_S if self._created_role else 0)
        delay = 1.0
        while True:
            try:
                self.template_arn = self.iot.create_provisioning_template(**kwargs)["templateArn"]
                return
            except ClientError as exc:
                # A new role is not assumable at once; AWS then refuses the template.
                code = exc.response.get("Error", {}).get("Code")
                if code != "InvalidRequestException" or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 8.0)

    def _create_role(self) -> None:
        if self.iam is None:
            raise ValueError("create_role needs an IAM client")
        name = self.spec.name("provisioning")
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "iot.amazonaws.com"},
                           "Action": "sts:AssumeRole"}],
        }
        role = self.iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                                    Description=f"fleetbench run {self.prefix}: provisioning",
                                    Tags=[{"Key": "fleetbench-run", "Value": self.prefix}])
        self._created_role = name
        self.iam.attach_role_policy(RoleName=name, PolicyArn=THINGS_REGISTRATION_POLICY_ARN)
        self.role_arn = role["Role"]["Arn"]

    # -- claims -------------------------------------------------------------------------------
    def _claim_dir(self, kind: str) -> Path:
        with self._lock:
            self._claims += 1
            n = self._claims
        directory = self.workdir / "claims" / f"{kind}-{n:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def create_claim(self) -> ClaimCredentials:
        """A claim certificate (ACTIVE) with the restricted claim policy; key file mode 0600."""
        made = self.iot.create_keys_and_certificate(setAsActive=True)
        self.track_certificate(made["certificateId"])
        with self._lock:
            self._claim_ids.append(made["certificateId"])
        directory = self._claim_dir("claim")
        cert_path, key_path = directory / "claim.pem", directory / "claim.key"
        pki.write_public(cert_path, made["certificatePem"])
        pki.write_secret(key_path, made["keyPair"]["PrivateKey"])
        self.iot.attach_policy(policyName=self.claim_policy_name, target=made["certificateArn"])
        log.info("event=claim_created prefix=%s cert=%s", self.prefix, made["certificateId"])
        return ClaimCredentials(cert_path, key_path, made["certificateId"])

    def create_trusted_user_claim(self) -> ClaimCredentials:
        """A temporary claim from CreateProvisioningClaim (spec fleet §2.1), valid 5 minutes.

        It is not in the registry (nothing to tear down); ``expiration`` is epoch seconds.
        """
        made = self.iot.create_provisioning_claim(templateName=self.template_name)
        with self._lock:
            self._claim_ids.append(made["certificateId"])
        directory = self._claim_dir("trusted-user")
        cert_path, key_path = directory / "claim.pem", directory / "claim.key"
        pki.write_public(cert_path, made["certificatePem"])
        pki.write_secret(key_path, made["keyPair"]["PrivateKey"])
        expiration = made.get("expiration")
        expires = expiration.timestamp() if hasattr(expiration, "timestamp") else expiration
        log.info("event=trusted_user_claim prefix=%s cert=%s", self.prefix, made["certificateId"])
        return ClaimCredentials(cert_path, key_path, made["certificateId"], temporary=True,
                                expiration=float(expires) if expires is not None else None)

    @property
    def claim_certificate_ids(self) -> tuple[str, ...]:
        """Every claim this fleet handed out (claim certificates and trusted-user claims)."""
        with self._lock:
            return tuple(self._claim_ids)

    def track_certificate(self, certificate_id: str) -> None:
        """Remove this certificate at teardown too (for example one a device created but
        never registered, which no thing or policy leads to)."""
        with self._lock:
            if certificate_id not in self._certificates:
                self._certificates.append(certificate_id)

    # -- teardown -----------------------------------------------------------------------------
    def teardown(self) -> CleanupReport:
        """Remove everything the run created, devices' things, certificates and policies
        included; idempotent. Leftovers are in the report (and logged), never silent."""
        with self._lock:
            certificates = list(self._certificates)
        teardown = Teardown(self.iot, self.prefix, iam=self.iam,
                            retry_timeout=self.retry_timeout)
        report = teardown.sweep(certificates=certificates, templates=[self.template_name],
                                roles=[self._created_role] if self._created_role else [])
        # the claims' certificates are gone; their keys go too
        shutil.rmtree(self.workdir if self._owns_workdir else self.workdir / "claims",
                      ignore_errors=True)
        self._torn_down = report
        if report.ok:
            log.info("event=fleet_removed %s", report.summary())
        else:
            log.warning("event=fleet_leftovers %s", report.summary())
        return report

    def __enter__(self) -> Fleet:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()
