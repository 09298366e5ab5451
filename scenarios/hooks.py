"""Pre-provisioning hook targets for the hook scenarios (spec fleet-provisioning §4).

The emulator has no Lambda: the scenarios map a Lambda ARN to one of these functions
(``python:scenarios.hooks:<name>``, through ``PUT /_fleetbench/hooks`` or
``fleetbench emulator --hook ARN=python:scenarios.hooks:<name>``). They are written as
Lambda handlers (``handler(event, context)``), so the same code could be deployed as the
real function. Each one plays one answer AWS documents: allow with
``parameterOverrides``, deny, fail, answer something that is not a hook answer, or not
answer within the five seconds AWS waits.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: The location the allowing hook assigns, whatever the device said (spec fleet §4:
#: overrides win over the device's parameters).
HOOK_LOCATION = "assigned-by-hook"
#: Longer than AWS's five-second hook limit (spec fleet §4, §5).
NEVER_ANSWERS_AFTER_S = 30.0


def allow_with_overrides(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Allow, and hand back what the hook was told as parameters the template uses, so
    the thing shows that the overrides landed and what AWS's input event carried."""
    return {
        "allowProvisioning": True,
        "parameterOverrides": {
            "Location": HOOK_LOCATION,
            "HookClaim": str(event.get("claimCertificateId", "")),
            "HookCertificate": str(event.get("certificateId", "")),
            "HookClient": str(event.get("clientId", "")),
            "HookTemplate": str(event.get("templateArn", "")),
        },
    }


def deny(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """A hook that says no (``allowProvisioning`` false)."""
    return {"allowProvisioning": False}


def fail(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """A hook whose backend is down: the Lambda raises."""
    raise RuntimeError("the device database is unreachable")


def garbage(event: dict[str, Any], context: Any) -> Any:
    """A hook that answers something that is not a hook answer (not an object)."""
    return ["yes", "please"]


async def never_answers(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """A hook that does not answer in time (async, so the emulator can cancel it)."""
    await asyncio.sleep(NEVER_ANSWERS_AFTER_S)
    return {"allowProvisioning": True}
