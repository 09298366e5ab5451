"""The control plane's backend: the registry's operations plus those the endpoint answers itself.

The control plane calls ``backend.<operation_in_snake_case>(**members)``. Most
operations live on the registry (one method each); this class adds the few that
need the running endpoint (``DescribeEndpoint``, ``CreateProvisioningClaim``)
and forwards everything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.errors import InvalidRequestException, ResourceNotFoundException

if TYPE_CHECKING:
    from harness.emulator.app import Emulator

#: Endpoint types DescribeEndpoint knows (spec broker §5.3).
ENDPOINT_TYPES = ("iot:Data", "iot:Data-ATS", "iot:CredentialProvider", "iot:Jobs")


class IotBackend:
    """One method per AWS IoT control-plane operation."""

    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    def describe_endpoint(self, endpoint_type: str | None = None) -> dict[str, Any]:
        """The emulator's MQTT host (it matches the server certificate; spec broker §5.3).

        UNCONFIRMED: an omitted ``endpointType`` answers like ``iot:Data`` (the legacy host);
        here every known type maps to the one emulator host.
        """
        if endpoint_type is not None and endpoint_type not in ENDPOINT_TYPES:
            raise InvalidRequestException(f"Endpoint type {endpoint_type} is not valid.")
        info = self._emulator.info
        host = info.mqtt_server_name if info is not None else "localhost"
        return {"endpoint_address": host}

    def create_provisioning_claim(self, template_name: str) -> Any:
        provisioning = self._emulator.provisioning
        if provisioning is None:
            raise ResourceNotFoundException("Fleet provisioning is not available in this emulator")
        return provisioning.create_provisioning_claim(template_name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._emulator.registry, name)
