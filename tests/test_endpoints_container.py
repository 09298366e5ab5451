"""ContainerEndpoint and the repository's Dockerfile.

Without a Docker engine the container itself cannot run, so the tests that need one skip
with that reason; everything else is checked here: the container's command line is
accepted by the real ``fleetbench emulator`` parser, ``endpoint.json`` is rewritten for
the host, an unreachable engine is reported, and the plugin skips with the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.cli import build_parser
from harness.endpoint_info import EndpointInfo
from harness.endpoints.base import EndpointError, EndpointKind
from harness.endpoints.container import (
    CONTAINER_API_PORT,
    CONTAINER_DATA_DIR,
    CONTAINER_MQTT_PORT,
    REPO_ROOT,
    ContainerEndpoint,
    container_arguments,
    docker_unavailable_reason,
    host_endpoint_info,
)

pytest_plugins = ("pytester",)

DOCKERFILE = REPO_ROOT / "Dockerfile"
NO_ENGINE = "tcp://127.0.0.1:1"  # nothing listens on port 1


def entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*?\])\s*$", DOCKERFILE.read_text().replace("\\\n", ""),
                      re.MULTILINE)
    assert match, "Dockerfile has no exec-form ENTRYPOINT"
    return list(json.loads(match.group(1)))


def test_the_image_runs_fleetbench_emulator_on_all_interfaces_with_a_data_volume() -> None:
    command = entrypoint()
    assert command[:2] == ["fleetbench", "emulator"]
    args = build_parser().parse_args(command[1:] + container_arguments(api_token="t" * 32))
    assert (args.host, args.api_host) == ("0.0.0.0", "0.0.0.0")
    assert (args.mqtt_port, args.api_port) == (CONTAINER_MQTT_PORT, CONTAINER_API_PORT)
    assert str(args.data_dir) == CONTAINER_DATA_DIR
    assert args.api_token == "t" * 32  # the API is exposed beyond loopback: token required
    text = DOCKERFILE.read_text()
    assert re.search(rf"^EXPOSE .*\b{CONTAINER_MQTT_PORT}\b.*\b{CONTAINER_API_PORT}\b", text,
                     re.MULTILINE)
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE)


def test_the_build_context_leaves_out_history_tests_and_reports() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", "tests", "reports"} <= ignored
    for needed in ("harness", "devices", "pyproject.toml"):
        assert needed not in ignored


def test_container_arguments_name_the_engines_host_in_the_server_certificate() -> None:
    args = container_arguments(api_token="secret", host_names=["docker-host", "localhost"],
                               region="eu-west-1", account_id="111122223333")
    parsed = build_parser().parse_args(entrypoint()[1:] + args)
    assert parsed.san == ["docker-host"]  # localhost is always in the certificate
    assert (parsed.region, parsed.account_id) == ("eu-west-1", "111122223333")


def test_endpoint_json_is_rewritten_with_the_mapped_ports(tmp_path: Path) -> None:
    inside = EndpointInfo(mqtt_host="127.0.0.1", mqtt_port=CONTAINER_MQTT_PORT,
                          api_url=f"http://127.0.0.1:{CONTAINER_API_PORT}",
                          ca_file=f"{CONTAINER_DATA_DIR}/ca.pem", region="us-east-1",
                          account_id="123456789012", data_dir=CONTAINER_DATA_DIR,
                          mqtt_server_name="localhost", pid=7)
    outside = host_endpoint_info(inside, host="10.0.0.5", mqtt_port=32768, api_port=32769,
                                 ca_file=tmp_path / "ca.pem", data_dir=tmp_path)
    assert (outside.mqtt_host, outside.mqtt_port) == ("10.0.0.5", 32768)
    assert outside.api_url == "http://10.0.0.5:32769"
    assert outside.ca_file == str(tmp_path / "ca.pem")
    assert outside.mqtt_server_name == "localhost"  # what the server certificate names


def test_an_unreachable_engine_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    reason = docker_unavailable_reason()
    assert reason is not None and "no Docker engine reachable" in reason
    with pytest.raises(EndpointError, match="no Docker engine reachable"):
        ContainerEndpoint.start(build=False)


def test_the_plugin_skips_container_runs_without_an_engine(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    pytester.makepyfile("def test_needs_endpoint(endpoint): pass")
    result = pytester.runpytest("-p", "no:labgrid", "-p", "no:hypothesispytest",
                                "-p", "no:cacheprovider",
                                "--endpoint", "container", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*--endpoint container: no Docker engine reachable*"])


@pytest.mark.slow
def test_the_container_serves_the_control_plane() -> None:
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with ContainerEndpoint.start() as endpoint:
        assert endpoint.kind is EndpointKind.CONTAINER
        assert endpoint.iot.list_things()["things"] == []
        assert endpoint.clock.advance(1) > 0
        assert Path(endpoint.ca_file).read_text().startswith("-----BEGIN CERTIFICATE-----")
