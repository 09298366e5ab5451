"""Pre-provisioning hooks (spec fleet-provisioning.md §4).

AWS calls a Lambda function before RegisterThing creates anything. The emulator has no
Lambda, so each hook ARN is mapped to a local stand-in:

* ``python:module:function`` -- ``function(payload) -> dict``, sync or ``async def``; a
  Lambda-style ``handler(event, context)`` also works (``context`` is ``None``), so a real
  Lambda's code can be used unchanged;
* ``http://...`` / ``https://...`` -- the payload is POSTed as JSON, the answer is JSON;
* ``cmd:<command line>`` -- split with :mod:`shlex` (no shell), payload JSON on stdin,
  answer JSON on stdout, non-zero exit is an error; on timeout the whole process group
  is killed.

Whatever a target does wrong (raise, hang, exit non-zero, answer garbage) becomes a
denial with a precise reason rather than an exception, so the provisioning service
has one rule: not allowed -> 403 on the rejected topic (``protocol.hook_denied()``).
The reason is safe to record in an observation: certificate PEMs are redacted from it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from importlib import import_module
from types import MappingProxyType
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import aiohttp

logger = logging.getLogger(__name__)

#: AWS's limit: a hook that has not answered within 5 seconds fails RegisterThing (§4).
HOOK_TIMEOUT_SECONDS = 5.0
#: How long a cancelled target gets to clean up (kill its processes) before it is abandoned.
CLEANUP_GRACE_SECONDS = 1.0
#: Largest answer read from an HTTP or command target; Lambda's own response cap is 6 MB.
MAX_ANSWER_BYTES = 6 * 1024 * 1024
#: AWS's limit on ``preProvisioningHook.targetArn`` (§4).
MAX_ARN_LENGTH = 2048
#: Worker threads of the runner's own executor (sync python targets, imports).
DEFAULT_WORKERS = 4

REASON_ALLOWED = "allowed"
REASON_DENIED = "denied"
REASON_TIMEOUT = "timeout"
REASON_NO_TARGET = "no target"
ERROR_PREFIX = "error: "
MALFORMED_PREFIX = "malformed answer: "

_DETAIL_CHARS = 200
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.S)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class HookInput:
    """What AWS sends the Lambda (§4). ``claim_certificate_id`` is the certificate the
    requesting connection authenticated with, ``certificate_id`` the new one."""

    claim_certificate_id: str
    certificate_id: str
    certificate_pem: str = field(repr=False)
    template_arn: str
    client_id: str
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    def to_payload(self) -> dict[str, Any]:
        """The input event with AWS's camelCase keys (a fresh dict per call)."""
        return {
            "claimCertificateId": self.claim_certificate_id,
            "certificateId": self.certificate_id,
            "certificatePem": self.certificate_pem,
            "templateArn": self.template_arn,
            "clientId": self.client_id,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True)
class HookOutcome:
    """The verdict. ``reason`` is ``allowed``, ``denied``, ``timeout``, ``no target``,
    ``error: ...`` or ``malformed answer: ...``; only ``allowed`` lets provisioning go on."""

    allowed: bool
    parameter_overrides: dict[str, str] = field(default_factory=dict)
    reason: str = REASON_ALLOWED

    @classmethod
    def deny(cls, reason: str) -> HookOutcome:
        return cls(allowed=False, parameter_overrides={}, reason=reason)


class _TargetFailed(Exception):
    """The target itself failed (reason text follows ``error: ``)."""


class _MalformedAnswer(Exception):
    """The target answered something that is not a usable hook answer."""


def _scrub(text: str) -> str:
    """One short line with PEM blocks removed: safe for logs and observations."""
    text = _PEM_BLOCK.sub("[PEM redacted]", text)
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _describe(exc: BaseException) -> str:
    message = _scrub(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _json_answer(body: bytes) -> Any:
    if len(body) > MAX_ANSWER_BYTES:
        raise _MalformedAnswer(f"larger than {MAX_ANSWER_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise _MalformedAnswer("not JSON") from None


# --------------------------------------------------------------------------- targets


class HookTarget(Protocol):
    """A local stand-in for the Lambda; ``call`` returns the decoded answer."""

    kind: ClassVar[str]

    async def call(self, payload: dict[str, Any], executor: Executor) -> Any: ...


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _wants_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a Lambda-style ``handler(event, context)``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) >= 2


@dataclass(frozen=True)
class PythonTarget:
    """``python:module:function``; sync functions run in the executor, async ones on the loop."""

    module: str
    function: str
    kind: ClassVar[str] = "python"

    @classmethod
    def parse(cls, target: str) -> PythonTarget:
        module, _, function = target.removeprefix("python:").rpartition(":")
        if not _is_dotted_name(module) or not function.isidentifier():
            raise ValueError("python hook targets look like python:package.module:function")
        return cls(module, function)

    def _load(self) -> tuple[Callable[..., Any], bool]:
        try:
            fn = getattr(import_module(self.module), self.function)
        except Exception as exc:  # import runs arbitrary module code
            raise _TargetFailed(
                f"cannot load {self.module}:{self.function}: {_describe(exc)}"
            ) from None
        if not callable(fn):
            raise _TargetFailed(f"{self.module}:{self.function} is not callable")
        return fn, _wants_context(fn)

    async def call(self, payload: dict[str, Any], executor: Executor) -> Any:
        loop = asyncio.get_running_loop()
        try:
            # Importing reads files: off the loop like everything else that may block.
            fn, with_context = await loop.run_in_executor(executor, self._load)
            args = (payload, None) if with_context else (payload,)
            if inspect.iscoroutinefunction(fn):
                return await fn(*args)
            result = await loop.run_in_executor(executor, partial(fn, *args))
            return await result if inspect.isawaitable(result) else result
        except SystemExit as exc:  # would otherwise stop the event loop itself
            raise _TargetFailed(_describe(exc)) from None


@dataclass(frozen=True)
class HttpTarget:
    """``http(s)://...``: JSON POST of the input event; a 2xx JSON body is the answer."""

    url: str
    kind: ClassVar[str] = "http"

    @classmethod
    def parse(cls, target: str) -> HttpTarget:
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("http hook targets need a URL with a host, e.g. http://127.0.0.1:8080/")
        return cls(target)

    async def call(self, payload: dict[str, Any], executor: Executor) -> Any:
        async with aiohttp.ClientSession() as session, session.post(
            self.url, json=payload
        ) as response:
            if response.status // 100 != 2:
                raise _TargetFailed(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    break
        return _json_answer(bytes(body))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class CommandTarget:
    """``cmd:<command line>``: argv via shlex (no shell), JSON on stdin and stdout.

    The command runs in a session of its own, so a timeout kills it and everything it
    started (one ``killpg``).
    """

    argv: tuple[str, ...]
    kind: ClassVar[str] = "cmd"

    @classmethod
    def parse(cls, target: str) -> CommandTarget:
        try:
            argv = tuple(shlex.split(target.removeprefix("cmd:")))
        except ValueError as exc:
            raise ValueError(f"cmd hook target cannot be split: {exc}") from None
        if not argv:
            raise ValueError("cmd hook targets need a command, e.g. cmd:/usr/bin/my-hook --flag")
        return cls(argv)

    async def call(self, payload: dict[str, Any], executor: Executor) -> Any:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        finished = False
        try:
            out, err = await proc.communicate(json.dumps(payload).encode())
            finished = True
        finally:
            if not finished:  # timed out or cancelled: take the whole group down
                _kill_group(proc.pid)
                await proc.wait()
        code = proc.returncode
        if code != 0:
            status = f"killed by signal {-code}" if code and code < 0 else f"exit status {code}"
            stderr = _scrub(err.decode("utf-8", "replace"))
            raise _TargetFailed(f"{status}: {stderr}" if stderr else status)
        return _json_answer(out)


#: Target kinds by the text before the first colon.
TARGET_KINDS: Mapping[str, Callable[[str], HookTarget]] = MappingProxyType({
    "python": PythonTarget.parse,
    "http": HttpTarget.parse,
    "https": HttpTarget.parse,
    "cmd": CommandTarget.parse,
})


def parse_target(target: str) -> HookTarget:
    """Validate a target string; ``ValueError`` names what was expected."""
    kind = TARGET_KINDS.get(target.partition(":")[0])
    if kind is None:
        raise ValueError(
            "unknown hook target kind: expected python:module:function, http(s)://... "
            "or cmd:<command line>"
        )
    return kind(target)


def _check_arn(arn: str) -> None:
    if (
        not arn.startswith("arn:")
        or len(arn) > MAX_ARN_LENGTH
        or "=" in arn
        or any(c.isspace() for c in arn)
    ):
        raise ValueError(
            f"hook ARN {arn[:80]!r} must start with 'arn:', have no spaces or '=', "
            f"and be at most {MAX_ARN_LENGTH} characters"
        )


# --------------------------------------------------------------------------- mapping


class HookTargets:
    """Thread-safe mapping from Lambda ARN to target string, validated on every write."""

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._targets: dict[str, tuple[str, HookTarget]] = {}
        if mapping:
            self.replace(mapping)

    @staticmethod
    def _entry(arn: str, target: str) -> tuple[str, HookTarget]:
        _check_arn(arn)
        return target, parse_target(target)

    def set(self, arn: str, target: str) -> None:
        entry = self._entry(arn, target)
        with self._lock:
            self._targets[arn] = entry

    def get(self, arn: str) -> str | None:
        with self._lock:
            entry = self._targets.get(arn)
        return entry[0] if entry else None

    def resolve(self, arn: str) -> HookTarget | None:
        """The parsed target for ``arn``, or ``None`` when unmapped."""
        with self._lock:
            entry = self._targets.get(arn)
        return entry[1] if entry else None

    def as_dict(self) -> dict[str, str]:
        with self._lock:
            return {arn: entry[0] for arn, entry in self._targets.items()}

    def replace(self, mapping: Mapping[str, str]) -> None:
        """Swap in a whole new mapping; nothing changes if any entry is invalid."""
        entries = {arn: self._entry(arn, target) for arn, target in mapping.items()}
        with self._lock:
            self._targets = entries

    @staticmethod
    def parse_cli(spec: str) -> tuple[str, str]:
        """``ARN=TARGET`` (as given to ``--hook``) → ``(arn, target)``, validated."""
        arn, sep, target = spec.partition("=")
        if not sep:
            raise ValueError("hook mappings look like ARN=TARGET")
        HookTargets._entry(arn, target)
        return arn, target


# --------------------------------------------------------------------------- runner


def _truthy(value: object) -> bool:
    """§4: boolean true, the string "true" in any case, or a non-zero number."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.lower() == "true"
    if isinstance(value, (int, float)):
        return value != 0 and not math.isnan(value)
    return False


def _interpret(answer: Any) -> HookOutcome:
    if not isinstance(answer, Mapping):
        kind = "null" if answer is None else type(answer).__name__
        return HookOutcome.deny(f"{MALFORMED_PREFIX}expected an object, got {kind}")
    if not _truthy(answer.get("allowProvisioning")):
        return HookOutcome.deny(REASON_DENIED)
    overrides = answer.get("parameterOverrides")
    if overrides is None:
        return HookOutcome(allowed=True)
    if not isinstance(overrides, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in overrides.items()
    ):
        return HookOutcome.deny(f"{MALFORMED_PREFIX}parameterOverrides must map strings to strings")
    return HookOutcome(allowed=True, parameter_overrides=dict(overrides))


class HookRunner:
    """Invokes the target mapped to a hook ARN with AWS's time limit.

    ``executor`` runs sync python targets and imports; by default the runner makes a
    small thread pool of its own (so a hung hook never holds the loop's default
    executor) and :meth:`close` releases it. A sync python target that hangs cannot be
    killed: its thread runs on after the timeout. Use an async or ``cmd:`` target to
    simulate hangs at scale.
    """

    def __init__(
        self,
        targets: HookTargets,
        *,
        timeout: float = HOOK_TIMEOUT_SECONDS,
        executor: Executor | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError("hook timeout must be positive")
        self.targets = targets
        self.timeout = timeout
        self._executor = executor
        self._own_executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    def _pool(self) -> Executor:
        if self._executor is not None:
            return self._executor
        with self._executor_lock:
            if self._own_executor is None:
                self._own_executor = ThreadPoolExecutor(
                    max_workers=DEFAULT_WORKERS, thread_name_prefix="fleetbench-hook"
                )
            return self._own_executor

    def close(self) -> None:
        """Release the runner's own thread pool (a given executor is the caller's)."""
        with self._executor_lock:
            pool, self._own_executor = self._own_executor, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def invoke(self, target_arn: str, hook_input: HookInput) -> HookOutcome:
        """Run the hook for ``target_arn``; never raises for hook misbehaviour."""
        started = time.monotonic()
        target = self.targets.resolve(target_arn)
        if target is None:
            outcome = HookOutcome.deny(REASON_NO_TARGET)
        else:
            outcome = await self._call(target, hook_input.to_payload())
        logger.info(
            "event=hook arn=%s kind=%s cert=%s client_id=%s allowed=%s reason=%s elapsed_ms=%.1f",
            target_arn,
            target.kind if target else "-",
            hook_input.certificate_id,
            hook_input.client_id,
            outcome.allowed,
            outcome.reason,
            (time.monotonic() - started) * 1000,
        )
        return outcome

    async def _call(self, target: HookTarget, payload: dict[str, Any]) -> HookOutcome:
        task = asyncio.ensure_future(target.call(payload, self._pool()))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=CLEANUP_GRACE_SECONDS)
            return HookOutcome.deny(REASON_TIMEOUT)
        if task.cancelled():
            return HookOutcome.deny(f"{ERROR_PREFIX}the hook cancelled itself")
        try:
            answer = task.result()
        except _MalformedAnswer as exc:
            return HookOutcome.deny(f"{MALFORMED_PREFIX}{exc}")
        except _TargetFailed as exc:
            return HookOutcome.deny(f"{ERROR_PREFIX}{exc}")
        except Exception as exc:  # the hook's own failure, whatever it is
            return HookOutcome.deny(f"{ERROR_PREFIX}{_describe(exc)}")
        return _interpret(answer)
