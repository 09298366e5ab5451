"""AWS IoT's request-rate quotas, enforced with token buckets on the shared :class:`Clock`.

A load run against the emulator should meet the throttles the real account will
impose, so that devices' back-off is exercised before a launch; a functional or
pure-throughput run should meet none. Hence three ways to configure a
:class:`QuotaSet`: ``aws`` (AWS's default table, :data:`AWS_DEFAULTS`), single
``API=N/s`` specs (``RegisterThing=5/s``, ``iot:CreateThing=2/s,burst=4``,
``RegisterThing=off``), or nothing at all (the default: no quota applies).

Quota names (one naming scheme, shared with :mod:`.faults`):

* ``CreateKeysAndCertificate``, ``CreateCertificateFromCsr``, ``RegisterThing``: the
  fleet provisioning MQTT API. A throttled request is answered on its ``rejected``
  topic with 429 ``ThrottlingException`` (spec fleet §5, ``harness.protocol.throttled``).
* ``iot:<Operation>``: a control-plane operation (botocore's name; the ``iot:`` prefix
  may be left out where the name is not also an MQTT API, e.g. ``CreateProvisioningClaim``).
  A throttled call gets 400 ``ThrottlingException`` "Rate exceeded" (spec broker §5.2),
  which boto3 retries in every retry mode, as with AWS.
* ``Connect`` (CONNECTs per second per account) and ``ConnectPerClientId``: the broker's
  own limiters (:class:`~harness.emulator.broker_settings.BrokerSettings`
  ``account_connect_rate`` / ``connect_rate_per_client_id``, read on the same clock).
  An exceeded CONNECT is refused as AWS does: a 3.1.1 connection is closed without
  CONNACK, MQTT 5 gets CONNACK 0x97. ``ConnectPerClientId`` is on in the broker by default
  (AWS: 1/s, not adjustable); a quota set changes it only when it names it
  (``ConnectPerClientId=off`` switches it off).

Emulator guesses (AWS documents rates, not bucket sizes): a bucket holds
:data:`DEFAULT_BURST_SECONDS` seconds' worth of requests (at least one) unless a spec
says ``burst=``; each bucket starts full. Control-plane calls that RegisterThing makes on
the account's behalf are not counted against control-plane quotas (spec fleet §5 assumes
AWS counts them; not modelled).

``python -m harness.emulator.quotas`` prints the README table (:func:`describe_quotas`).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Protocol

from harness import protocol
from harness.clock import Clock
from harness.errors import ProvisioningError, ThrottlingException
from harness.observations import Kind, ObservationLog

log = logging.getLogger("fleetbench.quotas")

#: Bucket size in seconds of the rate, when a spec gives no ``burst`` (UNCONFIRMED: AWS
#: publishes rates only; one second's worth lets a burst of exactly the TPS through).
DEFAULT_BURST_SECONDS = 1.0
#: The prefix that names a control-plane operation.
CONTROL_PLANE_PREFIX = "iot:"
#: CONNECTs per second per account / per client id (spec broker §1.8).
CONNECT = "Connect"
CONNECT_PER_CLIENT_ID = "ConnectPerClientId"
#: The fleet provisioning MQTT operations (AWS's names).
MQTT_APIS: tuple[str, ...] = tuple(api.value for api in protocol.Api)
#: Preset names for ``--quotas``.
PRESET_AWS = "aws"
PRESET_NONE = "none"
PRESETS = (PRESET_AWS, PRESET_NONE)
#: AWS's message for a throttled control-plane call.
CONTROL_PLANE_THROTTLE_MESSAGE = "Rate exceeded"

_SPEC_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z:]+)\s*=\s*(?:(?P<off>off|none|unlimited)|"
    r"(?P<rate>\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(?P<unit>s|sec|second|m|min|minute))?"
    r"(?:\s*,\s*burst\s*=\s*(?P<burst>\d+(?:\.\d*)?|\.\d+))?)\s*$",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- API names


class ApiKind(str, Enum):
    """Where a named API is served (decides how a quota or a fault applies)."""

    MQTT = "mqtt"  # fleet provisioning MQTT API
    CONNECT = "connect"  # MQTT CONNECT / TLS handshake
    CONTROL_PLANE = "control-plane"  # the boto3 ``iot`` API


@dataclass(frozen=True)
class ApiName:
    """A resolved API name: ``name`` is canonical (``iot:`` prefix for control-plane ops)."""

    kind: ApiKind
    name: str

    @property
    def operation(self) -> str:
        """The bare operation name (``iot:CreateThing`` → ``CreateThing``)."""
        return self.name.removeprefix(CONTROL_PLANE_PREFIX)


class UnknownApiError(ValueError):
    """A name that is no MQTT API, connect limit or control-plane operation."""


@functools.lru_cache(maxsize=1)
def control_plane_operations() -> frozenset[str]:
    """Every operation in botocore's ``iot`` model (loaded once, on first use)."""
    from harness.emulator.controlplane import iot_service_model

    return frozenset(iot_service_model().operation_names)


def resolve_api(text: str) -> ApiName:
    """The canonical :class:`ApiName` for ``text``; :class:`UnknownApiError` naming the
    closest known names otherwise."""
    name = text.strip()
    if name in MQTT_APIS:
        return ApiName(ApiKind.MQTT, name)
    if name in (CONNECT, CONNECT_PER_CLIENT_ID):
        return ApiName(ApiKind.CONNECT, name)
    operations = control_plane_operations()
    bare = name.removeprefix(CONTROL_PLANE_PREFIX)
    if bare in operations:
        return ApiName(ApiKind.CONTROL_PLANE, CONTROL_PLANE_PREFIX + bare)
    known = [*MQTT_APIS, CONNECT, CONNECT_PER_CLIENT_ID,
             *(CONTROL_PLANE_PREFIX + op if op in MQTT_APIS else op for op in sorted(operations))]
    close = difflib.get_close_matches(bare, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownApiError(
        f"unknown API {text!r}{hint}; expected one of {', '.join(MQTT_APIS)}, {CONNECT}, "
        f"{CONNECT_PER_CLIENT_ID} or a control-plane operation such as iot:CreateThing")


# --------------------------------------------------------------------------- rates


class QuotaSpecError(ValueError):
    """A quota spec or preset that cannot be used (the message says what was expected)."""


@dataclass(frozen=True)
class Rate:
    """``per_second`` sustained, ``burst`` requests at once (the bucket's size)."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second > 0):
            raise QuotaSpecError(f"a rate must be a positive number, got {self.per_second!r}")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise QuotaSpecError(f"a burst must be at least 1 request, got {self.burst!r}")

    @classmethod
    def of(cls, per_second: float, burst: float | None = None) -> Rate:
        """A rate whose burst defaults to :data:`DEFAULT_BURST_SECONDS` of it (at least 1)."""
        if burst is None:
            burst = max(1.0, float(per_second) * DEFAULT_BURST_SECONDS)
        return cls(float(per_second), float(burst))

    @property
    def default_burst(self) -> bool:
        return self.burst == Rate.of(self.per_second).burst

    def spec(self) -> str:
        """The ``N/s`` text (with ``,burst=M`` when not the default)."""
        text = f"{_number(self.per_second)}/s"
        return text if self.default_burst else f"{text},burst={_number(self.burst)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_quota_spec(text: str) -> tuple[ApiName, Rate | None]:
    """``"RegisterThing=5/s"`` → (RegisterThing, 5/s); ``"RegisterThing=off"`` → (…, None).

    Accepted: ``N``, ``N/s``, ``N/min``, an optional ``,burst=M``, or ``off``.
    """
    match = _SPEC_RE.match(text)
    if match is None:
        raise QuotaSpecError(
            f"quota {text!r} is not API=N/s (examples: RegisterThing=5/s, "
            "iot:CreateThing=15/s,burst=30, Connect=off)")
    try:
        api = resolve_api(match["name"])
    except UnknownApiError as exc:
        raise QuotaSpecError(str(exc)) from None
    if match["off"]:
        return api, None
    per_second = float(match["rate"])
    unit = (match["unit"] or "s").lower()
    if unit.startswith("m"):
        per_second /= 60.0
    burst = float(match["burst"]) if match["burst"] else None
    if api.kind is ApiKind.CONNECT and burst is not None:
        raise QuotaSpecError(f"{api.name} takes no burst (the broker's limiter is fixed)")
    try:
        return api, Rate.of(per_second, burst)
    except QuotaSpecError as exc:
        raise QuotaSpecError(f"quota {text!r}: {exc}") from None


# --------------------------------------------------------------------------- AWS's table


@dataclass(frozen=True)
class QuotaDefault:
    """One row of AWS's default quota table, with where the value comes from."""

    name: str
    per_second: float
    aws_name: str
    quota_code: str | None
    adjustable: bool | None
    source: str
    confidence: str


#: ``--quotas aws``: AWS's defaults for the operations fleetbench uses.
AWS_DEFAULTS: tuple[QuotaDefault, ...] = (
    QuotaDefault("CreateKeysAndCertificate", 10.0,
                 "Fleet Provisioning CreateKeysAndCertificate MQTT API TPS", "L-CAFFCA46", True,
                 "spec fleet §5 (S24)", "quota name confirmed; value from an archived 2023 "
                 "quota page (UNCONFIRMED)"),
    QuotaDefault("CreateCertificateFromCsr", 100.0,
                 "Fleet Provisioning CreateCertificateFromCsr MQTT API TPS", "L-83161BB8", True,
                 "spec fleet §5 (S24)", "quota name confirmed; value UNCONFIRMED (same source)"),
    QuotaDefault("RegisterThing", 10.0, "Fleet Provisioning RegisterThing MQTT API TPS",
                 "L-B2BBBD8C", True, "spec fleet §5 (S24, S13)",
                 "quota name confirmed; value UNCONFIRMED, consistent with S13"),
    QuotaDefault("iot:CreateProvisioningClaim", 10.0, "CreateProvisioningClaim API TPS", None,
                 True, "spec fleet §5 (S24)", "quota name confirmed; value UNCONFIRMED"),
    QuotaDefault(CONNECT, 500.0, "Connect requests per second per account", None, True,
                 "spec broker §1.8, fleet §5 (S24); perf-notes", "historical default; regional "
                 "variations"),
    QuotaDefault(CONNECT_PER_CLIENT_ID, 1.0, "Connect requests per second per client ID", None,
                 False, "spec broker §1.8, fleet §5 (S24, S25)", "confirmed"),
    QuotaDefault("iot:RegisterThing", 10.0, "RegisterThing API TPS (control plane)", None, True,
                 "spec fleet §5 (S24, 2019 table)", "historical"),
    QuotaDefault("iot:CreateCertificateFromCsr", 15.0, "CreateCertificateFromCsr API TPS", None,
                 True, "spec fleet §5 (S24, 2019 table)", "historical"),
    QuotaDefault("iot:CreateThing", 15.0, "CreateThing API TPS", None, True,
                 "spec fleet §5, broker §5.4 (S24, 2019 table)", "historical"),
    QuotaDefault("iot:AttachPolicy", 15.0, "AttachPolicy API TPS", None, True,
                 "spec fleet §5, broker §5.4 (S24, 2019 table)", "historical"),
    QuotaDefault("iot:AttachThingPrincipal", 15.0, "AttachThingPrincipal API TPS", None, True,
                 "spec fleet §5 (S24, 2019 table)", "historical"),
    QuotaDefault("iot:UpdateCertificate", 10.0, "UpdateCertificate API TPS", None, True,
                 "spec fleet §5 (S24, 2019 table); perf-notes", "historical"),
    QuotaDefault("iot:DeleteCertificate", 10.0, "DeleteCertificate API TPS", None, True,
                 "perf-notes (teardown 10 TPS)", "historical"),
    QuotaDefault("iot:DescribeThing", 350.0, "DescribeThing API TPS", None, True,
                 "spec broker §5.4 (older table)", "historical"),
    QuotaDefault("iot:RegisterCertificate", 10.0, "RegisterCertificate API TPS", None, True,
                 "spec broker §5.4 (older table)", "historical"),
)


def describe_quotas() -> str:
    """The README table: every ``--quotas aws`` value with its AWS name and source."""
    lines = [
        "| `--quota` name | AWS default | adjustable | AWS quota (code) | source | confidence |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in AWS_DEFAULTS:
        adjustable = {True: "yes", False: "no", None: "?"}[row.adjustable]
        code = f" ({row.quota_code})" if row.quota_code else ""
        lines.append(f"| `{row.name}` | {_number(row.per_second)}/s | {adjustable} | "
                     f"{row.aws_name}{code} | {row.source} | {row.confidence} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- quota sets


@dataclass(frozen=True)
class QuotaSet:
    """Quotas by canonical API name; ``None`` = explicitly unlimited (matters for the
    broker's ``ConnectPerClientId``, which is on unless switched off)."""

    rates: Mapping[str, Rate | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", MappingProxyType(dict(self.rates)))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def none(cls) -> QuotaSet:
        """No quota applies (the default: functional and pure-throughput runs)."""
        return cls()

    @classmethod
    def aws(cls) -> QuotaSet:
        """AWS's defaults (:data:`AWS_DEFAULTS`)."""
        return cls({row.name: Rate.of(row.per_second) for row in AWS_DEFAULTS})

    @classmethod
    def preset(cls, name: str) -> QuotaSet:
        if name == PRESET_AWS:
            return cls.aws()
        if name == PRESET_NONE:
            return cls.none()
        raise QuotaSpecError(f"unknown quota preset {name!r}; expected one of "
                             f"{', '.join(PRESETS)}")

    @classmethod
    def from_specs(cls, specs: Iterable[str] = (), *, preset: str | None = None) -> QuotaSet:
        """``preset`` (if any), then each ``API=N/s`` spec on top (later ones win)."""
        quotas = cls.preset(preset) if preset else cls()
        for spec in specs:
            quotas = quotas.with_spec(spec)
        return quotas

    def with_spec(self, spec: str) -> QuotaSet:
        api, rate = parse_quota_spec(spec)
        return self.with_rate(api.name, rate)

    def with_rate(self, name: str, rate: Rate | None) -> QuotaSet:
        """A copy with ``name`` (any accepted spelling) limited to ``rate`` (None: off)."""
        api = resolve_api(name)
        rates = dict(self.rates)
        rates[api.name] = rate
        return QuotaSet(rates)

    # -- reading --------------------------------------------------------------------------
    def get(self, name: str) -> Rate | None:
        return self.rates.get(name)

    def limits(self) -> dict[str, Rate]:
        """The quotas that limit something (explicit ``off`` entries left out)."""
        return {name: rate for name, rate in self.rates.items() if rate is not None}

    def __bool__(self) -> bool:
        return bool(self.rates)

    def broker_overrides(self) -> dict[str, float | None]:
        """The :class:`BrokerSettings` fields the connect quotas set (only those named)."""
        out: dict[str, float | None] = {}
        if CONNECT in self.rates:
            rate = self.rates[CONNECT]
            out["account_connect_rate"] = rate.per_second if rate else None
        if CONNECT_PER_CLIENT_ID in self.rates:
            rate = self.rates[CONNECT_PER_CLIENT_ID]
            out["connect_rate_per_client_id"] = rate.per_second if rate else None
        return out

    # -- wire -----------------------------------------------------------------------------
    def to_wire(self) -> dict[str, str]:
        """``{"RegisterThing": "10/s", "ConnectPerClientId": "off"}`` (admin API)."""
        return {name: rate.spec() if rate else "off" for name, rate in sorted(self.rates.items())}

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any], *, preset: str | None = None) -> QuotaSet:
        """The inverse of :meth:`to_wire` (values are spec right-hand sides)."""
        quotas = cls.preset(preset) if preset else cls()
        for name, value in doc.items():
            if not isinstance(name, str) or not isinstance(value, (str, int, float)) \
                    or isinstance(value, bool):
                raise QuotaSpecError(f"quota {name!r}: expected a rate such as \"5/s\" or "
                                     "\"off\"")
            quotas = quotas.with_spec(f"{name}={value}")
        return quotas


# --------------------------------------------------------------------------- enforcement


class TokenBucket:
    """``rate.burst`` tokens, refilled at ``rate.per_second`` on the shared clock.

    Moving the clock forward refills the bucket, as that much time would. Thread-safe.
    """

    def __init__(self, rate: Rate, clock: Clock) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate.burst
        self._at = clock.now()
        self._lock = threading.Lock()

    def try_acquire(self, tokens: float = 1.0, *, at: float | None = None) -> bool:
        """Take ``tokens`` if the bucket holds them; False (and nothing taken) otherwise.

        ``at`` is when the request arrived (the clock's time now when None): a request
        that waited behind others on a busy loop is charged at its arrival, so the quota
        holds over arrival times, which is what a client observes. Time never runs
        backwards for the bucket: a late arrival time is charged at the bucket's latest.
        """
        with self._lock:
            now = self._clock.now() if at is None else at
            elapsed = max(0.0, now - self._at)
            self._at = max(self._at, now)
            self._tokens = min(self.rate.burst, self._tokens + elapsed * self.rate.per_second)
            if self._tokens >= tokens:
                self._tokens -= tokens
                return True
            return False

    @property
    def tokens(self) -> float:
        with self._lock:
            elapsed = max(0.0, self._clock.now() - self._at)
            return min(self.rate.burst, self._tokens + elapsed * self.rate.per_second)


class _HasSettings(Protocol):
    settings: Any


class QuotaEnforcer:
    """The running emulator's quotas: one bucket per limited API, replaceable at run time
    (admin API). Throttles are recorded as ``throttled`` observations."""

    def __init__(self, quotas: QuotaSet | None = None, *, clock: Clock,
                 observations: ObservationLog | None = None) -> None:
        self._clock = clock
        self._observations = observations
        self._lock = threading.Lock()
        self._quotas = QuotaSet()
        self._buckets: dict[str, TokenBucket] = {}
        self._broker: _HasSettings | None = None
        self._broker_base: Any = None
        self.replace(quotas or QuotaSet())

    @property
    def quotas(self) -> QuotaSet:
        return self._quotas

    def bind_broker(self, broker: _HasSettings) -> None:
        """Apply the connect quotas to ``broker.settings`` now and on every :meth:`replace`
        (the broker's settings at this moment are the base)."""
        self._broker = broker
        self._broker_base = broker.settings
        self._apply_to_broker()

    def replace(self, quotas: QuotaSet) -> None:
        """Enforce ``quotas`` from now on (buckets start full)."""
        buckets = {name: TokenBucket(rate, self._clock)
                   for name, rate in quotas.limits().items()
                   if resolve_api(name).kind is not ApiKind.CONNECT}
        with self._lock:
            self._quotas = quotas
            self._buckets = buckets
        self._apply_to_broker()
        log.info("event=quotas_set quotas=%s", ",".join(
            f"{k}={v}" for k, v in quotas.to_wire().items()) or "none")

    def _apply_to_broker(self) -> None:
        if self._broker is None or self._broker_base is None:
            return
        overrides = self._quotas.broker_overrides()
        self._broker.settings = self._broker_base.replace(**overrides) if overrides \
            else self._broker_base

    def admit(self, name: str, *, at: float | None = None) -> bool:
        """Whether a request to ``name`` (canonical) that arrived ``at`` (now when None) is
        within its quota (True when none)."""
        bucket = self._buckets.get(name)
        return bucket is None or bucket.try_acquire(at=at)

    def check_mqtt(self, api: str, *, client_id: str | None = None,
                   certificate_id: str | None = None,
                   received_at: float | None = None) -> ProvisioningError | None:
        """The 429 rejection for a throttled MQTT API request that the broker received at
        ``received_at`` (now when None), or None to go on."""
        if self.admit(api, at=received_at):
            return None
        self._record(api, client_id, certificate_id)
        return protocol.throttled(api)

    def check_control_plane(self, operation: str) -> None:
        """Raise 400 ``ThrottlingException`` when ``operation`` (botocore's name) is over
        its quota."""
        name = CONTROL_PLANE_PREFIX + operation
        if not self.admit(name):
            self._record(name, None, None)
            raise ThrottlingException(CONTROL_PLANE_THROTTLE_MESSAGE)

    def _record(self, name: str, client_id: str | None, certificate_id: str | None) -> None:
        rate = self._quotas.get(name)
        if self._observations is not None:
            self._observations.record(Kind.THROTTLED, client_id=client_id,
                                      certificate_id=certificate_id, api=name,
                                      quota=rate.spec() if rate else None, source="quota")


# --------------------------------------------------------------------------- command line


def _quota_arg(text: str) -> str:
    """argparse ``type=``: validate one spec early (a bad one is a usage error, exit 2)."""
    try:
        parse_quota_spec(text)
    except QuotaSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_quota_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quotas aws|none`` and ``--quota API=N/s`` (repeatable), for ``fleetbench
    emulator`` and ``fleetbench load``."""
    parser.add_argument("--quotas", choices=PRESETS, default=None,
                        help="aws: enforce AWS's default quotas (provisioning APIs, control "
                             "plane, connects); none (default): no quota applies")
    parser.add_argument("--quota", action="append", default=[], type=_quota_arg,
                        metavar="API=N/s",
                        help="set one quota on top of --quotas, e.g. RegisterThing=5/s, "
                             "iot:CreateThing=15/s,burst=30, Connect=off (repeatable)")


def quotas_from_args(args: argparse.Namespace) -> QuotaSet:
    """The :class:`QuotaSet` the options of :func:`add_quota_arguments` describe."""
    return QuotaSet.from_specs(getattr(args, "quota", None) or (),
                               preset=getattr(args, "quotas", None))


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(describe_quotas())
