"""The emulator in a container (the repository's ``Dockerfile``), run with testcontainers.

For teams that keep their test endpoint in a container. The image's entry point is
``fleetbench emulator`` listening on all interfaces inside the container; as that
exposes the control plane beyond loopback, each start gets a fresh random API token
(the harness signs with it). ``endpoint.json`` and the CA are read out of the container
with ``docker exec`` (which works with a remote engine too) and rewritten with the
host's mapped ports. The server certificate names ``localhost`` and the engine's host,
so devices verify ``mqtt_server_name`` whichever address they reach.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from harness import pki
from harness.endpoint_info import EndpointInfo
from harness.endpoints.base import EndpointError, EndpointKind
from harness.endpoints.emulated import EmulatedEndpoint

log = logging.getLogger("fleetbench.endpoints")

#: Tag the image is built under from the repository's Dockerfile.
DEFAULT_IMAGE = "fleetbench-emulator:latest"
#: Ports and data directory inside the container (the Dockerfile's ENTRYPOINT).
CONTAINER_MQTT_PORT = 8883
CONTAINER_API_PORT = 8443
CONTAINER_DATA_DIR = "/data"
#: Image build plus emulator start on a cold machine.
STARTUP_TIMEOUT_S = 120.0
#: The repository root, where the Dockerfile is.
REPO_ROOT = Path(__file__).resolve().parents[2]


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers; otherwise why not (a skip reason)."""
    try:
        import docker
    except ImportError:
        return "the docker Python package is not installed (pip install fleetbench[container])"
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure to reach the engine means "not available"
        return f"no Docker engine reachable: {type(exc).__name__}: {exc}"
    return None


def container_arguments(*, api_token: str, host_names: Sequence[str] = (),
                        region: str = "us-east-1", account_id: str = "123456789012") -> list[str]:
    """Options appended to the image's ``fleetbench emulator`` entry point."""
    args = ["--api-token", api_token, "--region", region, "--account-id", account_id]
    for name in dict.fromkeys(host_names):
        if name not in ("localhost", "127.0.0.1"):
            args += ["--san", name]
    return args


def host_endpoint_info(inside: EndpointInfo, *, host: str, mqtt_port: int, api_port: int,
                       ca_file: Path, data_dir: Path) -> EndpointInfo:
    """``endpoint.json`` as seen from the host: mapped ports, the local copy of the CA."""
    return dataclasses.replace(
        inside, mqtt_host=host, mqtt_port=int(mqtt_port), api_url=f"http://{host}:{api_port}",
        ca_file=str(ca_file), data_dir=str(data_dir), pid=0)


def build_image(tag: str = DEFAULT_IMAGE, context: Path = REPO_ROOT) -> str:
    """Build the emulator image from ``context``'s Dockerfile; returns the tag."""
    from testcontainers.core.image import DockerImage

    DockerImage(path=context, tag=tag, clean_up=False).build()
    return tag


class ContainerEndpoint(EmulatedEndpoint):
    """An emulator container this object started and will remove."""

    kind: ClassVar[EndpointKind] = EndpointKind.CONTAINER

    def __init__(self, info: EndpointInfo, *, api_token: str, container: Any,
                 workdir: Path) -> None:
        super().__init__(info, api_token=api_token)
        self.container = container
        self.workdir = workdir

    @classmethod
    def start(cls, image: str = DEFAULT_IMAGE, *, build: bool = True,
              region: str = "us-east-1", account_id: str = "123456789012",
              startup_timeout: float = STARTUP_TIMEOUT_S) -> ContainerEndpoint:
        """Run ``image`` (built from the repository first when ``build``) and wait until it
        serves. Raises :class:`EndpointError` with the container's log on failure."""
        reason = docker_unavailable_reason()
        if reason is not None:
            raise EndpointError(reason)
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.docker_client import DockerClient

        if build:
            build_image(image)
        token = secrets.token_hex(16)
        host = DockerClient().host()
        container = (DockerContainer(image)
                     .with_exposed_ports(CONTAINER_MQTT_PORT, CONTAINER_API_PORT)
                     .with_command(container_arguments(api_token=token, host_names=[host],
                                                       region=region, account_id=account_id)))
        workdir = Path(tempfile.mkdtemp(prefix="fleetbench-container-"))
        try:
            container.start()
            inside = _wait_for_endpoint_json(container, startup_timeout)
            ca_file = workdir / "ca.pem"
            pki.write_public(ca_file, _read(container, f"{CONTAINER_DATA_DIR}/ca.pem"))
            info = host_endpoint_info(
                inside, host=container.get_container_host_ip(),
                mqtt_port=int(container.get_exposed_port(CONTAINER_MQTT_PORT)),
                api_port=int(container.get_exposed_port(CONTAINER_API_PORT)),
                ca_file=ca_file, data_dir=workdir)
        except BaseException as exc:
            logs = _logs(container)
            _stop(container)
            shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(exc, EndpointError):
                raise EndpointError(f"{exc}; container log:\n{logs}") from None
            raise
        log.info("event=container_started image=%s mqtt=%s:%d api=%s", image, info.mqtt_host,
                 info.mqtt_port, info.api_url)
        return cls(info, api_token=token, container=container, workdir=workdir)

    def logs(self) -> str:
        """The container's output, for failure reports."""
        return _logs(self.container)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "container": self.container.get_container_id()}

    def _stop_emulator(self) -> None:
        """Stop and remove the container and its workdir."""
        _stop(self.container)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _read(container: Any, path: str) -> str:
    result = container.exec(["cat", path])
    if result.exit_code != 0:
        raise FileNotFoundError(path)
    return bytes(result.output).decode()


def _wait_for_endpoint_json(container: Any, timeout: float) -> EndpointInfo:
    """Poll ``/data/endpoint.json`` inside the container (no cross-container event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return EndpointInfo.from_dict(json.loads(
                _read(container, f"{CONTAINER_DATA_DIR}/endpoint.json")))
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() >= deadline:
            raise EndpointError(f"the emulator container did not serve within {timeout:.0f} s")
        time.sleep(0.25)


def _logs(container: Any) -> str:
    try:
        out, err = container.get_logs()
        return (bytes(out) + bytes(err)).decode(errors="replace")[-8192:]
    except Exception:  # the container may never have started
        return ""


def _stop(container: Any) -> None:
    try:
        container.stop()
    except Exception as exc:  # already gone
        log.debug("event=container_stop_failed error=%s", type(exc).__name__)
