"""Pre-provisioning hook runner: targets, verdicts, failures and time limits (spec §4)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shlex
import socket
import sys
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from harness.emulator.hooks import (
    HOOK_TIMEOUT_SECONDS,
    HookInput,
    HookOutcome,
    HookRunner,
    HookTargets,
    parse_target,
)
from tests import hooks_fixtures

T = TypeVar("T")

ARN = "arn:aws:lambda:us-east-1:123456789012:function:pre-provisioning-hook"
FIXTURES = Path(hooks_fixtures.__file__)
PEM = (
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
)
HOOK_INPUT = HookInput(
    claim_certificate_id="c" * 64,
    certificate_id="d" * 64,
    certificate_pem=PEM,
    template_arn="arn:aws:iot:us-east-1:123456789012:provisioningtemplate/widget-template",
    client_id="device-0001",
    parameters={"SerialNumber": "0001", "DeviceLocation": "Berlin"},
)
#: Short limit for the tests; AWS's 5 s (HOOK_TIMEOUT_SECONDS) would make them slow.
TEST_TIMEOUT = 0.2


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def invoke(target: str, hook_input: HookInput = HOOK_INPUT, **runner_kw: Any) -> HookOutcome:
    runner = HookRunner(HookTargets({ARN: target}), **{"timeout": 3.0, **runner_kw})
    try:
        return run(runner.invoke(ARN, hook_input))
    finally:
        runner.close()


def python(name: str) -> str:
    return f"python:tests.hooks_fixtures:{name}"


def script(*args: str) -> str:
    return "cmd:" + shlex.join([sys.executable, str(FIXTURES), *args])


# --------------------------------------------------------------------------- python targets


def test_aws_guide_example_allows_and_overrides_parameters() -> None:
    # spec §4 (output): allowProvisioning true + parameterOverrides; Lambda-style (event, context)
    outcome = invoke(python("pre_provisioning_hook"))
    assert outcome == HookOutcome(True, {"DeviceLocation": "Seattle"}, "allowed")


def test_hook_receives_the_aws_input_event() -> None:
    # spec §4 (input event): camelCase keys, parameters as the device sent them
    outcome = invoke(python("echo"))
    assert json.loads(outcome.parameter_overrides["event"]) == {
        "claimCertificateId": "c" * 64,
        "certificateId": "d" * 64,
        "certificatePem": PEM,
        "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/widget-template",
        "clientId": "device-0001",
        "parameters": {"SerialNumber": "0001", "DeviceLocation": "Berlin"},
    }


def test_sync_python_hook_runs_in_the_given_executor() -> None:
    # Never block the loop: sync hooks go to the executor
    with ThreadPoolExecutor(1, thread_name_prefix="given-pool") as pool:
        outcome = invoke(python("echo"), executor=pool)
    assert outcome.parameter_overrides["thread"].startswith("given-pool")


def test_async_python_hook_is_awaited() -> None:
    # spec §4: string "True" is truthy (case-insensitive)
    outcome = invoke(python("allow_async"))
    assert outcome == HookOutcome(True, {"SerialNumber": "0001-v2"}, "allowed")


def test_hook_that_denies_gives_denied_without_overrides() -> None:
    # spec §4: falsy allowProvisioning denies; overrides of a denial are dropped
    assert invoke(python("deny")) == HookOutcome(False, {}, "denied")


@pytest.mark.parametrize(
    ("answer", "allowed"),
    [
        ("true", True),
        ('"true"', True),
        ('"TRUE"', True),
        ("1", True),
        ("-2.5", True),
        ("false", False),
        ('"false"', False),
        ('"yes"', False),
        ('"1"', False),
        ("0", False),
        ("0.0", False),
        ("null", False),
        ("[true]", False),
    ],
)
def test_allow_provisioning_truthiness(answer: str, allowed: bool) -> None:
    # spec §4: boolean true, "true" in any case, non-zero numbers; anything else denies
    hook_input = HookInput("c" * 64, "d" * 64, PEM, "arn:t", "id",
                           {"answer": json.dumps({"allowProvisioning": json.loads(answer)})})
    outcome = invoke(python("answer_from_parameters"), hook_input)
    assert outcome.allowed is allowed
    assert outcome.reason == ("allowed" if allowed else "denied")


def test_missing_allow_provisioning_denies() -> None:
    # spec §4: a response without allowProvisioning fails RegisterThing
    hook_input = HookInput("c" * 64, "d" * 64, PEM, "arn:t", "id",
                           {"answer": '{"parameterOverrides": {"a": "b"}}'})
    assert invoke(python("answer_from_parameters"), hook_input) == HookOutcome.deny("denied")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ('["allowProvisioning"]', "malformed answer: expected an object, got list"),
        ('"true"', "malformed answer: expected an object, got str"),
        ('{"allowProvisioning": true, "parameterOverrides": {"n": 1}}',
         "malformed answer: parameterOverrides must map strings to strings"),
        ('{"allowProvisioning": true, "parameterOverrides": ["a"]}',
         "malformed answer: parameterOverrides must map strings to strings"),
    ],
)
def test_malformed_python_answers_deny_with_reason(answer: str, reason: str) -> None:
    # spec §4: overrides are a map string→string; the answer is an object
    hook_input = HookInput("c" * 64, "d" * 64, PEM, "arn:t", "id", {"answer": answer})
    assert invoke(python("answer_from_parameters"), hook_input) == HookOutcome.deny(reason)


def test_hook_returning_nothing_is_malformed() -> None:
    assert invoke(python("no_answer")).reason == "malformed answer: expected an object, got null"


def test_hook_exception_denies_and_keeps_the_pem_out_of_reason_and_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # spec §4: a Lambda error fails RegisterThing; secrets rule: no PEM in logs/observations
    with caplog.at_level(logging.DEBUG, logger="harness.emulator.hooks"):
        outcome = invoke(python("fail"))
    assert not outcome.allowed
    assert outcome.reason.startswith("error: RuntimeError: cannot check [PEM redacted]")
    assert "BEGIN CERTIFICATE" not in outcome.reason
    assert "event=hook" in caplog.text
    assert "BEGIN CERTIFICATE" not in caplog.text
    assert "MIIB" not in caplog.text


def test_hook_calling_sys_exit_is_an_error_not_an_exit() -> None:
    assert invoke(python("call_exit")) == HookOutcome.deny("error: SystemExit: 2")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("python:tests.no_such_module:hook", "error: cannot load tests.no_such_module:hook: "
                                             "ModuleNotFoundError"),
        ("python:tests.hooks_fixtures:missing", "error: cannot load tests.hooks_fixtures:missing: "
                                                "AttributeError"),
        ("python:tests.hooks_fixtures:NOT_CALLABLE",
         "error: tests.hooks_fixtures:NOT_CALLABLE is not callable"),
    ],
)
def test_unloadable_python_target_is_an_error(target: str, reason: str) -> None:
    outcome = invoke(target)
    assert not outcome.allowed
    assert outcome.reason.startswith(reason)


def test_async_hook_past_the_limit_times_out() -> None:
    # spec §4: no answer within the limit → RegisterThing fails
    assert invoke(python("hang_async"), timeout=TEST_TIMEOUT) == HookOutcome.deny("timeout")


def test_sync_hook_past_the_limit_times_out_without_blocking_the_loop() -> None:
    # spec §4 time limit; the loop keeps running while the hook's thread is stuck
    async def scenario() -> tuple[HookOutcome, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        runner = HookRunner(HookTargets({ARN: python("hang_sync")}), timeout=TEST_TIMEOUT)
        try:
            outcome = await runner.invoke(ARN, HOOK_INPUT)
        finally:
            hooks_fixtures.RELEASE.set()
            runner.close()
            tick_task.cancel()
        return outcome, ticks

    hooks_fixtures.RELEASE.clear()
    outcome, ticks = run(scenario())
    assert outcome == HookOutcome.deny("timeout")
    assert ticks >= 3


def test_default_timeout_is_aws_five_seconds() -> None:
    # spec §4 / §5: 5-second hook limit
    assert HOOK_TIMEOUT_SECONDS == 5.0
    assert HookRunner(HookTargets()).timeout == 5.0


def test_unmapped_arn_denies_with_no_target() -> None:
    runner = HookRunner(HookTargets())
    assert run(runner.invoke(ARN, HOOK_INPUT)) == HookOutcome.deny("no target")


# --------------------------------------------------------------------------- http targets


@asynccontextmanager
async def hook_server() -> AsyncIterator[tuple[str, list[Any]]]:
    """A local stand-in Lambda on 127.0.0.1:<ephemeral>; yields its URL and received events."""
    received: list[Any] = []

    async def allow(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response(
            {"allowProvisioning": True, "parameterOverrides": {"DeviceLocation": "Seattle"}}
        )

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"errorMessage": "boom"}, status=500)

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>not json</html>")

    async def stall(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.add_routes([web.post("/allow", allow), web.post("/broken", broken),
                    web.post("/garbage", garbage), web.post("/stall", stall)])
    app_runner = web.AppRunner(app, shutdown_timeout=0.1)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    host, port = app_runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", received
    finally:
        await app_runner.cleanup()


def invoke_http(path: str, timeout: float = 3.0) -> tuple[HookOutcome, list[Any]]:
    async def scenario() -> tuple[HookOutcome, list[Any]]:
        async with hook_server() as (url, received):
            runner = HookRunner(HookTargets({ARN: url + path}), timeout=timeout)
            return await runner.invoke(ARN, HOOK_INPUT), received

    return run(scenario())


def test_http_target_gets_the_event_as_json_and_its_answer_counts() -> None:
    # spec §4 input/output over a JSON POST
    outcome, received = invoke_http("/allow")
    assert outcome == HookOutcome(True, {"DeviceLocation": "Seattle"}, "allowed")
    assert received == [HOOK_INPUT.to_payload()]


def test_http_error_status_is_an_error() -> None:
    outcome, _ = invoke_http("/broken")
    assert outcome == HookOutcome.deny("error: HTTP 500")


def test_http_non_json_answer_is_malformed() -> None:
    outcome, _ = invoke_http("/garbage")
    assert outcome == HookOutcome.deny("malformed answer: not JSON")


def test_http_target_that_stalls_times_out() -> None:
    outcome, _ = invoke_http("/stall", timeout=TEST_TIMEOUT)
    assert outcome == HookOutcome.deny("timeout")


def test_http_target_that_refuses_connections_is_an_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = invoke(f"http://127.0.0.1:{port}/hook")
    assert not outcome.allowed
    assert outcome.reason.startswith("error: ClientConnectorError")


# --------------------------------------------------------------------------- cmd targets


def test_cmd_target_reads_the_event_on_stdin_and_answers_on_stdout() -> None:
    outcome = invoke(script("allow"))
    assert outcome == HookOutcome(
        True, {"DeviceLocation": "Seattle", "clientId": "device-0001"}, "allowed"
    )


def test_cmd_non_zero_exit_is_an_error_with_its_stderr() -> None:
    assert invoke(script("exit")) == HookOutcome.deny("error: exit status 3: hook blew up")


def test_cmd_non_json_stdout_is_malformed() -> None:
    assert invoke(script("garbage")) == HookOutcome.deny("malformed answer: not JSON")


def test_cmd_missing_executable_is_an_error() -> None:
    outcome = invoke("cmd:/nonexistent/fleetbench-hook")
    assert not outcome.allowed
    assert outcome.reason.startswith("error: FileNotFoundError")


def _gone(pid: int, timeout: float) -> bool:
    """Wait (on a pidfd, no polling) until ``pid`` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def test_cmd_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # spec §4 time limit; the hook's own children die with it
    pid_file = tmp_path / "grandchild.pid"
    outcome = invoke(script("hang", str(pid_file)), timeout=1.0)
    assert outcome == HookOutcome.deny("timeout")
    assert pid_file.exists(), "the hook script did not start its child within the limit"
    assert _gone(int(pid_file.read_text()), timeout=5.0)


# --------------------------------------------------------------------------- target mapping


def test_targets_are_validated_on_set() -> None:
    targets = HookTargets()
    for bad in ["lambda:foo", "python:nomodule", "python:a b:c", "python:mod:", "cmd:",
                "cmd:'unbalanced", "http://", "ftp://host/x"]:
        with pytest.raises(ValueError):
            targets.set(ARN, bad)
    for bad_arn in ["", "function-name", "arn:aws:lambda:x=y", "arn:aws:lambda: x"]:
        with pytest.raises(ValueError):
            targets.set(bad_arn, python("deny"))
    assert targets.as_dict() == {}


def test_targets_set_get_and_replace() -> None:
    targets = HookTargets({ARN: python("deny")})
    other = ARN + "-2"
    targets.set(other, "https://hooks.example.com/pre?x=1")
    assert targets.get(ARN) == python("deny")
    assert targets.get("arn:aws:lambda:us-east-1:1:function:none") is None
    assert targets.as_dict() == {ARN: python("deny"), other: "https://hooks.example.com/pre?x=1"}

    with pytest.raises(ValueError):
        targets.replace({ARN: python("echo"), other: "bogus"})
    assert targets.get(ARN) == python("deny"), "a rejected replace changes nothing"

    targets.replace({other: "cmd:/bin/true"})
    assert targets.as_dict() == {other: "cmd:/bin/true"}
    assert targets.resolve(other) == parse_target("cmd:/bin/true")


def test_parse_cli_splits_at_the_first_equals_sign() -> None:
    assert HookTargets.parse_cli(f"{ARN}=cmd:/usr/bin/hook --mode=strict") == (
        ARN, "cmd:/usr/bin/hook --mode=strict"
    )
    for bad in [ARN, f"{ARN}=", "=cmd:/bin/true", f"{ARN}=nope:x"]:
        with pytest.raises(ValueError):
            HookTargets.parse_cli(bad)


def test_hook_input_repr_leaves_out_the_pem() -> None:
    assert "BEGIN" not in repr(HOOK_INPUT)
