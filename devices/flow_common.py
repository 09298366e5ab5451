"""The parts of one boot that the SDK device and the virtual device run alike.

Both run fleet provisioning step by step over their own MQTT client (awsiotsdk, paho);
what does not depend on the client lives here once: the reboot decision from flash,
timing and recording a step, the device log's step and done lines, the client ids, the
template parameters and the telemetry message. Each device keeps what its client makes
different: its exceptions, connections, retries and faults.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from devices.base import ClaimCredentials, DeviceInputs, ErrorResponse, Step, StepRecord
from devices.credentials import CredentialStore, CredentialStoreError, DeviceState, Phase

__all__ = [
    "BootAction",
    "StepError",
    "claim_client_id",
    "device_client_id",
    "done_line",
    "probe_settled",
    "resume",
    "step_line",
    "telemetry_payload",
    "telemetry_topic",
    "template_parameters",
    "timed_step",
]


class BootAction(str, Enum):
    """What a boot does, from what flash says (the RESUME step's ``action``)."""

    REUSE = "reuse"  # registered: reconnect with the device certificate only
    FINISH = "finish"  # credentials saved: RegisterThing with the stored token
    RESTART = "restart"  # credentials saved but not to be finished: forget them
    START = "start"  # nothing of its own yet: the whole flow


def resume(store: CredentialStore, claim: ClaimCredentials, detail: dict[str, str], *,
           may_finish: bool) -> tuple[DeviceState, BootAction]:
    """The RESUME step: put the claim in flash, read the state and decide what to do
    (``may_finish=False`` starts over instead of finishing); ``detail`` records both."""
    store.install_claim(claim.cert_path, claim.key_path)
    state = store.load_state()
    if state.phase is Phase.REGISTERED:
        action = BootAction.REUSE
    elif state.phase is Phase.CREDENTIALS_SAVED:
        action = BootAction.FINISH if may_finish and store.load_token() else BootAction.RESTART
    else:
        action = BootAction.START
    detail.update(phase=state.phase.value, action=action.value)
    return state, action


def probe_settled(store: CredentialStore, usable: bool) -> bool:
    """Flash after a spent token's probe: a certificate that works means the endpoint
    registered us before the cut (the thing name was lost with the reply); one that does
    not is forgotten, to start over. Returns ``usable``."""
    if usable:
        store.mark_registered(None, {}, time.time())
    else:
        store.forget_progress()
    return usable


@dataclass(frozen=True)
class StepError:
    """Why a step failed, as its record says: an error code and facts for its detail."""

    code: str
    detail: Mapping[str, str] = field(default_factory=dict)


@contextmanager
def timed_step(step: Step, explain: Callable[[Exception], StepError | None],
               record: Callable[[StepRecord], None]) -> Iterator[dict[str, str]]:
    """Time the body and hand ``record`` the step's record, whether it worked or not.

    The body fills the yielded ``detail``. A failure ``explain`` recognises (a flash error
    always is) gives the record its error code and adds its facts to ``detail`` without
    overwriting the body's; the exception goes on either way.
    """
    detail: dict[str, str] = {}
    started, t0 = time.time(), time.perf_counter()
    error: StepError | None = None
    completed = False
    try:
        yield detail
        completed = True
    except Exception as exc:
        error = (StepError("CredentialStoreError", {"reason": str(exc)})
                 if isinstance(exc, CredentialStoreError) else explain(exc))
        if error is not None:
            for key, value in error.detail.items():
                detail.setdefault(key, value)
        raise
    finally:
        code = error.code if error is not None else None
        record(StepRecord(step.value, started, time.perf_counter() - t0,
                          completed and code is None, detail, code))


def step_line(record: StepRecord, *, omit: Collection[str] = ()) -> str:
    """The device log's line for a step; ``omit`` names detail keys kept out of it."""
    extra = " ".join(f"{k}={v}" for k, v in record.detail.items() if k not in omit)
    return (f"event=step name={record.name} ok={str(record.ok).lower()} "
            f"ms={record.duration * 1000:.1f}"
            + (f" error={record.error_code}" if record.error_code else "")
            + (f" {extra}" if extra else ""))


def done_line(error: ErrorResponse | None, failure: str | None) -> str:
    """The device log's last line of a boot."""
    ok = error is None and failure is None
    return (f"event=done ok={str(ok).lower()}"
            + (f" error={error.error_code}" if error else "")
            + (f" failure={failure!r}" if failure else ""))


def claim_client_id(inputs: DeviceInputs, prefix: str) -> str:
    """The claim connection's client id: the inputs' own, else ``<serial>-claim``, else
    ``prefix`` and a random suffix."""
    return inputs.client_id or (
        f"{inputs.serial}-claim" if inputs.serial else f"{prefix}{uuid.uuid4().hex[:12]}")


def device_client_id(configured: str | None, thing_name: str | None, inputs: DeviceInputs,
                     claim_id: str) -> str:
    """The client id of the connection with the new certificate: the configured one, else
    the thing name (what ``iot:Connection.Thing.ThingName`` policies expect), else the
    serial, else the claim's client id with ``-device``."""
    return configured or thing_name or inputs.serial or f"{claim_id}-device"


def template_parameters(inputs: DeviceInputs, serial_parameter: str | None) -> dict[str, str]:
    """RegisterThing's parameters: the inputs', plus the serial under ``serial_parameter``
    when they do not set that one themselves."""
    params = dict(inputs.parameters)
    if serial_parameter and inputs.serial and serial_parameter not in params:
        params[serial_parameter] = inputs.serial
    return params


def telemetry_topic(template: str | None, thing_name: str | None, client_id: str,
                    serial: str | None) -> str | None:
    """The telemetry topic the option's ``template`` names (``None``: no telemetry)."""
    if not template:
        return None
    return template.format(thing_name=thing_name or client_id, client_id=client_id,
                           serial=serial or "")


def telemetry_payload(serial: str | None, client_id: str) -> bytes:
    """The message a device publishes once connected with its new certificate."""
    return json.dumps({"serial": serial, "clientId": client_id,
                       "timestamp": time.time()}).encode()
