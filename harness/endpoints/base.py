"""What every endpoint gives a scenario, wherever the endpoint runs (design principle 1).

A scenario sees an :class:`Endpoint`: where devices connect over MQTT and what they
trust, a boto3 ``iot`` client for setting up and inspecting, the region and account,
and an observer that judges the run (principle 2). Only the emulator has a clock and
the admin extensions; :attr:`Endpoint.supports_emulator_extensions` says whether they
are there, so scenarios that need them can skip with a reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

if TYPE_CHECKING:
    from harness.observer import Observer


E = TypeVar("E", bound="Endpoint")


class EndpointKind(str, Enum):
    """The values of ``--endpoint``."""

    LOCAL = "local"
    CONTAINER = "container"
    AWS = "aws"


class EndpointError(RuntimeError):
    """An endpoint could not be started, reached or discovered."""


@dataclass(frozen=True)
class EndpointAddress:
    """Where devices connect and which CA bundle they trust.

    ``mqtt_server_name`` is the name to send as SNI and to verify the server
    certificate against; it differs from ``mqtt_host`` when the host is reached by an
    address the certificate does not name (a container's mapped port, for example).
    """

    mqtt_host: str
    mqtt_port: int
    mqtt_server_name: str
    ca_file: Path
    region: str
    account_id: str


class EndpointClock(Protocol):
    """The emulated clock, moved through the admin API (emulator only)."""

    def now(self) -> float: ...

    def advance(self, seconds: float) -> float: ...


class Endpoint(ABC):
    """An AWS IoT endpoint as the harness reaches it: MQTT over mutual TLS plus boto3."""

    kind: ClassVar[EndpointKind]
    #: Whether the admin extensions (clock, faults, full trace) exist on this endpoint.
    supports_emulator_extensions: ClassVar[bool] = False

    def __init__(self, address: EndpointAddress) -> None:
        self.address = address

    @property
    def mqtt_host(self) -> str:
        return self.address.mqtt_host

    @property
    def mqtt_port(self) -> int:
        return self.address.mqtt_port

    @property
    def mqtt_server_name(self) -> str:
        return self.address.mqtt_server_name

    @property
    def ca_file(self) -> Path:
        return self.address.ca_file

    @property
    def region(self) -> str:
        return self.address.region

    @property
    def account_id(self) -> str:
        return self.address.account_id

    @property
    @abstractmethod
    def iot(self) -> Any:
        """A boto3 ``iot`` client for this endpoint's control plane."""

    @abstractmethod
    def client(self, service_name: str) -> Any:
        """Another boto3 client (``iam``, ``iot-data`` ...) for the same account and region."""

    @property
    @abstractmethod
    def observer(self) -> Observer:
        """Reads what the endpoint saw (started on first use, closed with the endpoint)."""

    @property
    def clock(self) -> EndpointClock | None:
        """The emulated clock; None where time cannot be moved (AWS)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Plain facts for reports and failure messages (no secrets)."""
        return {
            "kind": self.kind.value,
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self.mqtt_port,
            "mqtt_server_name": self.mqtt_server_name,
            "ca_file": str(self.ca_file),
            "region": self.region,
            "account_id": self.account_id,
        }

    @abstractmethod
    def close(self) -> None:
        """Release everything the endpoint started (idempotent)."""

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.kind.value} {self.mqtt_host}:{self.mqtt_port} "
                f"{self.region}/{self.account_id}>")
