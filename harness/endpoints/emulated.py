"""An endpoint served by a fleetbench emulator, wherever that emulator runs.

:class:`LocalEndpoint` (subprocess or in-process) and :class:`ContainerEndpoint` only
differ in how they start the emulator and find its ``endpoint.json``; once they have
it, this class gives the boto3 client (pointed at the emulator's control plane), the
admin client, the emulated clock and the observer, all through the network, so an
emulator in another process or container behaves like one in this process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import boto3
from botocore.config import Config

from harness.admin_client import AdminClient
from harness.endpoint_info import EndpointInfo
from harness.endpoints.base import Endpoint, EndpointAddress

if TYPE_CHECKING:
    from harness.observer import EmulatorObserver

#: Access key id the harness signs emulator requests with (any id is accepted; the
#: secret is the API token when the emulator has one).
EMULATOR_ACCESS_KEY_ID = "fleetbench"
#: Secret used when the emulator runs without an API token (it accepts any).
EMULATOR_ANONYMOUS_SECRET = "fleetbench-no-token"


class RemoteClock:
    """The emulator's clock through ``/_fleetbench/clock``: works for any emulator process."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin

    def now(self) -> float:
        return self._admin.clock().now

    def advance(self, seconds: float) -> float:
        """Move the emulated clock forward; expiries (tokens, claims) take effect at once."""
        return self._admin.advance(seconds).now


def emulator_session(info: EndpointInfo, api_token: str | None) -> boto3.Session:
    """A boto3 session for the emulator that ignores the user's AWS credentials and profile."""
    return boto3.Session(
        aws_access_key_id=EMULATOR_ACCESS_KEY_ID,
        aws_secret_access_key=api_token or EMULATOR_ANONYMOUS_SECRET,
        region_name=info.region,
    )


class EmulatedEndpoint(Endpoint):
    """An emulator known by its ``endpoint.json``; subclasses own the process behind it
    and stop it in :meth:`_stop_emulator`."""

    supports_emulator_extensions: ClassVar[bool] = True

    def __init__(self, info: EndpointInfo, *, api_token: str | None = None,
                 mqtt_host: str | None = None, mqtt_port: int | None = None) -> None:
        super().__init__(EndpointAddress(
            mqtt_host=mqtt_host or info.mqtt_host,
            mqtt_port=mqtt_port or info.mqtt_port,
            mqtt_server_name=info.mqtt_server_name,
            ca_file=Path(info.ca_file),
            region=info.region,
            account_id=info.account_id,
        ))
        self.info = info
        self._api_token = api_token
        self._session = emulator_session(info, api_token)
        self._clients: dict[str, Any] = {}
        self._lock = threading.RLock()
        self.admin = AdminClient(info.api_url, api_token=api_token)
        self._clock = RemoteClock(self.admin)
        self._observer: EmulatorObserver | None = None
        self._closed = False

    @property
    def api_url(self) -> str:
        return self.info.api_url

    @property
    def iot(self) -> Any:
        return self.client("iot")

    def client(self, service_name: str) -> Any:
        """boto3 clients pointed at the emulator (it serves ``iot``; others answer 404)."""
        with self._lock:
            if service_name not in self._clients:
                self._clients[service_name] = self._session.client(
                    service_name,
                    endpoint_url=self.info.api_url,
                    config=Config(retries={"max_attempts": 4, "mode": "standard"}),
                )
            return self._clients[service_name]

    @property
    def observer(self) -> EmulatorObserver:
        from harness.observer import EmulatorObserver

        with self._lock:
            if self._observer is None:
                self._observer = EmulatorObserver(self.admin)
            return self._observer

    @property
    def clock(self) -> RemoteClock:
        return self._clock

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "api_url": self.info.api_url}

    def close(self) -> None:
        """Close the observer, then stop the emulator even if that failed; only the first
        call does anything."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._lock:
                observer, self._observer = self._observer, None
            if observer is not None:
                observer.close()
        finally:
            self._stop_emulator()

    def _stop_emulator(self) -> None:
        """Stop what this endpoint started (the subclass's process or container)."""
