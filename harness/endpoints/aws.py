"""A real AWS account, reached through the standard boto3 credential chain.

Only discovery differs from the emulator: the MQTT host is the account's ``iot:Data-ATS``
endpoint (DescribeEndpoint, spec broker §5.3), the CA bundle is Amazon's root CAs
(taken from certifi, which carries them), and the account id comes from STS. Every
other call is the same boto3 call the emulator answers, which is why CI can run this
class against the emulator by passing its control-plane URL, CA file and port.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import boto3
from botocore.config import Config

from harness import pki
from harness.endpoints.base import Endpoint, EndpointAddress, EndpointError, EndpointKind

if TYPE_CHECKING:
    from harness.observer import AwsObserver

log = logging.getLogger("fleetbench.endpoints")

#: AWS IoT's MQTT over TLS port.
AWS_MQTT_PORT = 8883
#: The endpoint type whose certificate chains to Amazon Trust Services roots.
ATS_ENDPOINT_TYPE = "iot:Data-ATS"
#: Subjects (CN) of the roots an ATS endpoint chains to: Amazon Root CA 1-4, and the
#: Starfield root that cross-signs them (older trust stores reach Amazon's roots by it).
AMAZON_ROOT_COMMON_NAMES = (
    "Amazon Root CA 1",
    "Amazon Root CA 2",
    "Amazon Root CA 3",
    "Amazon Root CA 4",
    "Starfield Services Root Certificate Authority - G2",
)


def amazon_root_ca_bundle(destination: Path) -> Path:
    """Write Amazon's root CAs, taken from certifi's bundle, to ``destination``."""
    import certifi

    keep: list[str] = []
    # certifi's entries are "# Issuer/Subject/Label" comments followed by the PEM (Mozilla's
    # format). Select by label: Starfield's root has serial 0, which cryptography warns
    # about and will refuse to parse; OpenSSL loads it fine.
    for entry in Path(certifi.where()).read_text().split("\n\n"):
        labels = [line.split('"')[1] for line in entry.splitlines()
                  if line.startswith('# Label: "')]
        if "-----BEGIN CERTIFICATE-----" in entry and set(labels) & set(AMAZON_ROOT_COMMON_NAMES):
            keep.append(entry[entry.index("-----BEGIN CERTIFICATE-----"):].strip() + "\n")
    if not keep:
        raise EndpointError("certifi's bundle carries none of Amazon's root CAs")
    pki.write_public(destination, "".join(keep))
    return destination


class AwsEndpoint(Endpoint):
    """An AWS account and region; its observer subscribes to lifecycle events."""

    kind: ClassVar[EndpointKind] = EndpointKind.AWS

    def __init__(self, session: boto3.Session, *, prefix: str = "fleetbench",
                 iot_endpoint_url: str | None = None, mqtt_port: int = AWS_MQTT_PORT,
                 ca_file: Path | None = None, account_id: str | None = None,
                 workdir: Path | None = None) -> None:
        """Discover the endpoint through ``session``.

        ``iot_endpoint_url``, ``mqtt_port``, ``ca_file`` and ``account_id`` override
        discovery; they exist so that this class can be exercised against the emulator.
        """
        region = session.region_name
        if not region:
            raise EndpointError("no AWS region: pass --aws-region or set one in the profile")
        self._session = session
        self._iot_endpoint_url = iot_endpoint_url
        self._clients: dict[str, Any] = {}
        self._lock = threading.RLock()
        self.prefix = prefix
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="fleetbench-aws-")) if workdir is None \
            else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            host = self.client("iot").describe_endpoint(
                endpointType=ATS_ENDPOINT_TYPE)["endpointAddress"]
            account = account_id or self.client("sts").get_caller_identity()["Account"]
            trust = Path(ca_file) if ca_file is not None else amazon_root_ca_bundle(
                self.workdir / "amazon-root-cas.pem")
        except BaseException:
            self._remove_workdir()
            raise
        super().__init__(EndpointAddress(mqtt_host=host, mqtt_port=mqtt_port,
                                         mqtt_server_name=host, ca_file=trust, region=region,
                                         account_id=account))
        self._observer: AwsObserver | None = None
        self._closed = False
        log.info("event=aws_endpoint host=%s region=%s account=%s", host, region, account)

    @classmethod
    def from_profile(cls, profile: str | None = None, region: str | None = None,
                     **kwargs: Any) -> AwsEndpoint:
        """``--aws-profile`` / ``--aws-region``; None means boto3's own defaults."""
        return cls(boto3.Session(profile_name=profile, region_name=region), **kwargs)

    @property
    def iot(self) -> Any:
        return self.client("iot")

    def client(self, service_name: str) -> Any:
        with self._lock:
            if service_name not in self._clients:
                endpoint_url = self._iot_endpoint_url if service_name == "iot" else None
                self._clients[service_name] = self._session.client(
                    service_name, endpoint_url=endpoint_url,
                    config=Config(retries={"max_attempts": 8, "mode": "standard"}))
            return self._clients[service_name]

    @property
    def observer(self) -> AwsObserver:
        from harness.observer import AwsObserver

        with self._lock:
            if self._observer is None:
                self._observer = AwsObserver.start(
                    self.client("iot"), host=self.mqtt_server_name, port=self.mqtt_port,
                    ca_file=self.ca_file, region=self.region, account_id=self.account_id,
                    prefix=self.prefix, workdir=self.workdir / "observer")
            return self._observer

    def _remove_workdir(self) -> None:
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            observer, self._observer = self._observer, None
        try:
            if observer is not None:
                observer.close()
        finally:
            self._remove_workdir()
