"""Hook targets for tests/test_hooks.py.

Python targets are the module-level functions (``python:tests.hooks_fixtures:<name>``);
run as a script (``cmd:<python> hooks_fixtures.py <mode>``) the file is a command target.
Kept free of heavy imports so the script starts fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

#: Set by a test to let :func:`hang_sync` return once the runner has given up on it.
RELEASE = threading.Event()


def pre_provisioning_hook(event: dict[str, Any], context: object) -> dict[str, Any]:
    """The AWS developer guide's Python example (pre-provisioning-hook.html), minus its
    ``print(event)``: a Lambda-style handler that allows and overrides DeviceLocation."""
    return {
        "allowProvisioning": True,
        "parameterOverrides": {"DeviceLocation": "Seattle"},
    }


def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """Allows, handing back the input event it received (as JSON) and the thread it ran on."""
    return {
        "allowProvisioning": True,
        "parameterOverrides": {
            "event": json.dumps(payload, sort_keys=True),
            "thread": threading.current_thread().name,
        },
    }


def answer_from_parameters(payload: dict[str, Any]) -> Any:
    """Answers whatever JSON the device put in its ``answer`` parameter."""
    return json.loads(payload["parameters"]["answer"])


async def allow_async(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "allowProvisioning": "True",
        "parameterOverrides": {"SerialNumber": payload["parameters"]["SerialNumber"] + "-v2"},
    }


def deny(payload: dict[str, Any]) -> dict[str, Any]:
    return {"allowProvisioning": False, "parameterOverrides": {"ignored": "yes"}}


def fail(payload: dict[str, Any]) -> dict[str, Any]:
    """Fails with the certificate PEM in its message, as careless hook code might."""
    raise RuntimeError(f"cannot check {payload['certificatePem']}")


def no_answer(payload: dict[str, Any]) -> None:
    return None


def call_exit(payload: dict[str, Any]) -> None:
    sys.exit(2)


NOT_CALLABLE = {"allowProvisioning": True}


async def hang_async(payload: dict[str, Any]) -> dict[str, Any]:
    """Never answers (cancelled by the runner's timeout)."""
    import asyncio

    await asyncio.Event().wait()
    return {"allowProvisioning": True}


def hang_sync(payload: dict[str, Any]) -> dict[str, Any]:
    """Blocks its executor thread until the test sets :data:`RELEASE`."""
    RELEASE.wait(10)
    return {"allowProvisioning": True}


def _main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "allow":
        event = json.load(sys.stdin)
        answer = {
            "allowProvisioning": True,
            "parameterOverrides": {"DeviceLocation": "Seattle", "clientId": event["clientId"]},
        }
        print(json.dumps(answer))
        return 0
    if mode == "exit":
        sys.stdin.read()
        print("hook blew up", file=sys.stderr)
        return 3
    if mode == "garbage":
        print("this is not json")
        return 0
    if mode == "hang":
        # Start a grandchild, report its pid, then never answer.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(argv[1] + ".tmp", "w") as fh:
            fh.write(f"{child.pid}\n")
        os.replace(argv[1] + ".tmp", argv[1])
        time.sleep(60)
        return 0
    print(f"unknown mode {mode}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
