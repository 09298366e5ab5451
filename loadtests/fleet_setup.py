"""A load run's provisioning setup: made once (on the master), handed to every worker.

On test start the master (or the only process) prepares the account through the control
plane with :class:`harness.fleet.Fleet`, exactly as the scenarios do: the provisioning
template, the claim policy and a claim certificate, all named with the run's prefix. It
then packs what devices need into a :class:`FleetHandoff` (endpoint address, CA, template,
claim), which travels to Locust workers inside the options Locust already sends with
every spawn message; each worker unpacks it into a private directory
(:func:`open_target`). On test stop :meth:`LoadFleet.teardown` is the scenarios' cleanup
(``Fleet.teardown``): things, certificates, policies, template, all found by prefix.

The claim is an EC P-256 certificate from the control plane's CreateCertificateFromCsr
by default (``--fleet-claim-key rsa`` asks CreateKeysAndCertificate for an RSA one, as
``fleetbench provision`` does): the claim's key is used in two handshakes per device, and
an RSA signature costs the load generator ~1 ms each.

The handoff holds the claim's private key (and the emulator's API token): it is never
logged or printed (``repr`` hides it), it crosses Locust's master/worker channel, which
is not encrypted (run distributed load tests on a trusted network), and the files
workers write from it are 0600 in a 0700 directory removed when the process ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from devices.base import EndpointParams
from devices.mqtt_transport import TlsIdentity
from harness import pki
from harness.endpoints.base import Endpoint
from harness.fleet import ClaimPolicyVariant, CleanupReport, Fleet, FleetSpec
from loadtests.flows import ClaimIssuer, FlowTarget

log = logging.getLogger("fleetbench.load.setup")

__all__ = [
    "ClaimKey",
    "EndpointChoice",
    "FleetHandoff",
    "LoadFleet",
    "open_endpoint",
    "open_target",
    "process_workdir",
]

#: Handoff format version (a worker refuses a handoff it cannot read).
HANDOFF_VERSION = 1


class EndpointChoice(str, Enum):
    """``--fleet-endpoint``: where the devices go."""

    LOCAL = "local"  # start an emulator for this Locust session (subprocess)
    FILE = "file"  # an emulator already running, by its endpoint.json
    AWS = "aws"  # a real account through the boto3 credential chain


class ClaimKey(str, Enum):
    """The claim certificate's key type."""

    EC = "ec"
    RSA = "rsa"


@dataclass(frozen=True)
class FleetHandoff:
    """What every process needs to run devices against the prepared fleet."""

    run_id: str
    prefix: str
    template_name: str
    endpoint_kind: str
    mqtt_host: str
    mqtt_port: int
    mqtt_server_name: str
    ca_pem: str = field(repr=False)
    region: str
    account_id: str
    claim_certificate_id: str
    claim_cert_pem: str = field(repr=False)
    claim_key_pem: str = field(repr=False)
    api_url: str | None = None
    api_token: str | None = field(default=None, repr=False)
    pacing_s: float = 2.0
    version: int = HANDOFF_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FleetHandoff:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != HANDOFF_VERSION:
            raise ValueError("the master's fleet handoff has another version than this "
                             "worker reads; run the same fleetbench on master and workers")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings reports must mask."""
        return tuple(s for s in (self.claim_key_pem, self.api_token) if s)


def _extra_args(options: Any) -> list[str]:
    args: list[str] = []
    for item in getattr(options, "fleet_emulator_arg", None) or ():
        args.extend(str(item).split())
    return args


def open_endpoint(options: Any) -> Endpoint:
    """The endpoint the ``--fleet-endpoint*`` options name (started here for ``local``)."""
    choice = EndpointChoice(getattr(options, "fleet_endpoint", None) or EndpointChoice.LOCAL)
    endpoint_file = getattr(options, "fleet_endpoint_file", None)
    if endpoint_file:
        choice = EndpointChoice.FILE
    api_token = getattr(options, "fleet_api_token", None) or None
    if choice is EndpointChoice.FILE:
        from harness.endpoints.local import LocalEndpoint

        if not endpoint_file:
            raise ValueError("--fleet-endpoint file needs --fleet-endpoint-file PATH")
        return LocalEndpoint.attach(Path(endpoint_file), api_token=api_token)
    if choice is EndpointChoice.LOCAL:
        from harness.endpoints.local import EmulatorMode, LocalEndpoint

        return LocalEndpoint.start(mode=EmulatorMode.SUBPROCESS, api_token=api_token,
                                   extra_args=_extra_args(options))
    from harness.endpoints.aws import AwsEndpoint

    return AwsEndpoint.from_profile(getattr(options, "fleet_aws_profile", None) or None,
                                    getattr(options, "fleet_aws_region", None) or None,
                                    prefix="fleetbench-load")


class LoadFleet:
    """One run's fleet on one endpoint (master side): setup, handoff, teardown."""

    def __init__(self, endpoint: Endpoint, run_id: str, prefix: str, *,
                 claim_key: ClaimKey | str = ClaimKey.EC, role_arn: str | None = None,
                 api_token: str | None = None, pacing_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.run_id = run_id
        self.prefix = prefix
        self.claim_key = ClaimKey(claim_key)
        self.pacing_s = pacing_s
        self._api_token = api_token
        create_role = endpoint.kind.value == "aws" and role_arn is None
        self.fleet = Fleet.for_endpoint(endpoint, FleetSpec(
            prefix=prefix, description=f"fleetbench load run {run_id}",
            claim_policy=ClaimPolicyVariant.BOTH, role_arn=role_arn, create_role=create_role))
        self.handoff: FleetHandoff | None = None
        self.cleanup: CleanupReport | None = None

    @property
    def template_name(self) -> str:
        return self.fleet.template_name

    def setup(self) -> FleetHandoff:
        """Template, claim policy and claim; on failure whatever was made is removed."""
        self.fleet.setup()
        try:
            cert_pem, key_pem, certificate_id = self._claim()
        except BaseException:
            self.teardown()
            raise
        api_url = getattr(self.endpoint, "api_url", None)
        self.handoff = FleetHandoff(
            run_id=self.run_id, prefix=self.prefix, template_name=self.template_name,
            endpoint_kind=self.endpoint.kind.value, mqtt_host=self.endpoint.mqtt_host,
            mqtt_port=self.endpoint.mqtt_port, mqtt_server_name=self.endpoint.mqtt_server_name,
            ca_pem=Path(self.endpoint.ca_file).read_text(), region=self.endpoint.region,
            account_id=self.endpoint.account_id, claim_certificate_id=certificate_id,
            claim_cert_pem=cert_pem, claim_key_pem=key_pem, api_url=api_url,
            api_token=self._api_token, pacing_s=self.pacing_s)
        log.info("event=load_fleet_ready prefix=%s template=%s claim=%s", self.prefix,
                 self.template_name, certificate_id)
        return self.handoff

    def _claim(self) -> tuple[str, str, str]:
        if self.claim_key is ClaimKey.RSA:
            claim = self.fleet.create_claim()
            return (claim.cert_path.read_text(), claim.key_path.read_text(),
                    claim.certificate_id)
        key = pki.generate_ec_key()
        made = self.endpoint.iot.create_certificate_from_csr(
            certificateSigningRequest=pki.make_csr(key, f"{self.prefix}-claim"),
            setAsActive=True)
        self.fleet.track_certificate(made["certificateId"])
        self.endpoint.iot.attach_policy(policyName=self.fleet.claim_policy_name,
                                        target=made["certificateArn"])
        return made["certificatePem"], pki.private_key_pem(key), made["certificateId"]

    def teardown(self) -> CleanupReport:
        """The scenarios' cleanup: everything carrying the prefix, devices' things included."""
        self.cleanup = self.fleet.teardown()
        return self.cleanup


def process_workdir(prefix: str = "fleetbench-load-") -> Path:
    """A private (0700) scratch directory for this process, in RAM when /dev/shm exists:
    every flow writes a key and a certificate, which should cost no disk I/O."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o700)
    return path


def control_plane(handoff: FleetHandoff, *, profile: str | None = None,
                  retries: int = 1) -> Any:
    """A boto3 ``iot`` client for the handoff's endpoint (the installer's app's client).

    ``retries`` is botocore's ``max_attempts``: 1 leaves throttle handling to the caller,
    which counts it."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": retries, "mode": "standard"},
                    max_pool_connections=50)
    if handoff.api_url:
        from harness.endpoints.emulated import (
            EMULATOR_ACCESS_KEY_ID,
            EMULATOR_ANONYMOUS_SECRET,
        )

        session = boto3.Session(aws_access_key_id=EMULATOR_ACCESS_KEY_ID,
                                aws_secret_access_key=handoff.api_token or
                                EMULATOR_ANONYMOUS_SECRET, region_name=handoff.region)
        return session.client("iot", endpoint_url=handoff.api_url, config=config)
    return boto3.Session(profile_name=profile, region_name=handoff.region).client(
        "iot", config=config)


def open_target(handoff: FleetHandoff, directory: Path, *, trusted_user: bool,
                profile: str | None = None) -> FlowTarget:
    """Unpack the handoff into ``directory`` (CA, claim) and describe the devices' target."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_file = directory / "ca.pem"
    pki.write_public(ca_file, handoff.ca_pem)
    cert, key = directory / "claim.pem", directory / "claim.key"
    pki.write_secret(key, handoff.claim_key_pem)
    pki.write_public(cert, handoff.claim_cert_pem)
    endpoint = EndpointParams(host=handoff.mqtt_host, port=int(handoff.mqtt_port), ca_file=ca_file,
                              server_name=handoff.mqtt_server_name or handoff.mqtt_host)
    issuer = ClaimIssuer(lambda: control_plane(handoff, profile=profile),
                         handoff.template_name) if trusted_user else None
    return FlowTarget(endpoint=endpoint, template_name=handoff.template_name,
                      prefix=handoff.prefix, claim=TlsIdentity.for_endpoint(endpoint, cert, key),
                      issuer=issuer)


def remove_workdir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def describe(handoff: FleetHandoff) -> Mapping[str, Any]:
    """Secret-free facts about the fleet, for the run's settings."""
    return {"prefix": handoff.prefix, "template": handoff.template_name,
            "claim_certificate_id": handoff.claim_certificate_id,
            "endpoint_kind": handoff.endpoint_kind, "region": handoff.region,
            "mqtt": f"{handoff.mqtt_host}:{handoff.mqtt_port}"}


def secrets_of(handoffs: Sequence[FleetHandoff | None]) -> tuple[str, ...]:
    return tuple(s for h in handoffs if h is not None for s in h.secrets)
