"""After a load run, the endpoint is the judge (design principle 2).

Locust counted flows as successes and failures from what the devices saw. This module
asks the endpoint, through the control plane only (the same boto3 calls work against
the emulator and AWS), whether that holds:

* every flow Locust counted as a success has its thing, the certificate it was issued is
  attached to that thing and ``ACTIVE``, and a policy is attached to the certificate;
* no flow that failed left an ``ACTIVE`` certificate behind (a certificate a device
  never learnt it owns, or a thing registered after the device gave up).

Bulk listings do most of the work (``ListCertificates`` once for every status,
``ListThings`` filtered by the run's ``fleetbench_run`` attribute); only the per-device
attachments cost a call each (``ListThingPrincipals``, ``ListAttachedPolicies``), made
with a few concurrent workers. Against AWS, whose control-plane quotas are low, check a
random ``sample`` of the successes instead of all of them; failures are always all checked.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from botocore.exceptions import ClientError

from loadtests.events import FlowOutcome

log = logging.getLogger("fleetbench.load.truth")

__all__ = ["ProblemKind", "TruthProblem", "TruthReport", "check_run"]

#: The attribute the default template gives every thing of the run (harness.fleet).
RUN_ATTRIBUTE = "fleetbench_run"
#: Problems listed in a report (the counts always cover all of them).
MAX_LISTED_PROBLEMS = 100
#: AWS's largest page sizes.
CERTIFICATE_PAGE = 250
THING_PAGE = 250


class ProblemKind(str, Enum):
    THING_MISSING = "thing_missing"
    CERTIFICATE_MISSING = "certificate_missing"
    CERTIFICATE_NOT_ATTACHED = "certificate_not_attached"
    CERTIFICATE_NOT_ACTIVE = "certificate_not_active"
    POLICY_MISSING = "policy_missing"
    FAILED_FLOW_LEFT_ACTIVE_CERTIFICATE = "failed_flow_left_active_certificate"


@dataclass(frozen=True)
class TruthProblem:
    """One disagreement between Locust's count and the endpoint (ids only, no secrets)."""

    kind: ProblemKind
    serial: str
    thing_name: str | None = None
    certificate_id: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "serial": self.serial, "thing_name": self.thing_name,
                "certificate_id": self.certificate_id, "detail": self.detail}

    def __str__(self) -> str:
        what = self.thing_name or self.serial
        cert = f" cert {self.certificate_id[:12]}" if self.certificate_id else ""
        return f"{self.kind.value}: {what}{cert} {self.detail}".rstrip()


@dataclass(frozen=True)
class TruthReport:
    """What the endpoint confirmed. ``verified`` of ``checked`` successes are complete;
    ``failed_with_active_certificate`` of ``failed_flows`` left an active certificate."""

    successes: int
    checked: int
    verified: int
    failed_flows: int
    failed_with_active_certificate: int
    interrupted_flows: int = 0
    interrupted_with_active_certificate: int = 0
    problems: tuple[TruthProblem, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verified == self.checked and self.failed_with_active_certificate == 0

    @property
    def sampled(self) -> bool:
        return self.checked < self.successes

    def summary_lines(self) -> list[str]:
        sample = f" (a random sample of {self.successes})" if self.sampled else ""
        lines = [
            f"truth: {self.verified} of {self.checked} successful flows{sample} have their "
            "thing, an ACTIVE certificate attached to it and a policy",
            f"truth: {self.failed_with_active_certificate} of {self.failed_flows} failed flows "
            "left an ACTIVE certificate behind",
        ]
        if self.interrupted_flows:
            lines.append(f"truth: {self.interrupted_flows} flows were cut short by the end of "
                         f"the run; {self.interrupted_with_active_certificate} of them hold an "
                         "ACTIVE certificate (not counted as failures)")
        lines += [f"  {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... {len(self.problems) - 20} more in results.json")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "successes": self.successes,
            "checked": self.checked,
            "verified": self.verified,
            "failed_flows": self.failed_flows,
            "failed_with_active_certificate": self.failed_with_active_certificate,
            "interrupted_flows": self.interrupted_flows,
            "interrupted_with_active_certificate": self.interrupted_with_active_certificate,
            "problems": [p.to_dict() for p in self.problems[:MAX_LISTED_PROBLEMS]],
            "problem_count": len(self.problems),
            "seconds": round(self.seconds, 3),
        }


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _pages(call: Callable[..., Mapping[str, Any]], key: str, token_in: str, token_out: str,
           **kwargs: Any) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = call(**kwargs, **({token_in: token} if token else {}))
        yield from page.get(key) or ()
        token = page.get(token_out)
        if not token:
            return


@dataclass
class _Registry:
    """What the bulk listings told us, plus per-item lookups on demand."""

    iot: Any
    prefix: str
    certificates: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (arn, status)
    things: set[str] = field(default_factory=set)
    status_by_arn: dict[str, str] = field(default_factory=dict)

    def load(self) -> None:
        for cert in _pages(self.iot.list_certificates, "certificates", "marker", "nextMarker",
                           pageSize=CERTIFICATE_PAGE):
            self.certificates[cert["certificateId"]] = (cert["certificateArn"], cert["status"])
            self.status_by_arn[cert["certificateArn"]] = cert["status"]
        for thing in _pages(self.iot.list_things, "things", "nextToken", "nextToken",
                            maxResults=THING_PAGE, attributeName=RUN_ATTRIBUTE,
                            attributeValue=self.prefix):
            self.things.add(thing["thingName"])

    def certificate(self, certificate_id: str) -> tuple[str, str] | None:
        known = self.certificates.get(certificate_id)
        if known is not None:
            return known
        try:
            made = self.iot.describe_certificate(certificateId=certificate_id)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise
        desc = made["certificateDescription"]
        return desc["certificateArn"], desc["status"]

    def thing_exists(self, thing_name: str) -> bool:
        if thing_name in self.things:
            return True
        try:
            self.iot.describe_thing(thingName=thing_name)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return False
            raise
        return True

    def principals(self, thing_name: str) -> list[str]:
        return list(_pages(self.iot.list_thing_principals, "principals", "nextToken",
                           "nextToken", thingName=thing_name))

    def policies(self, target: str) -> list[str]:
        return [p["policyName"] for p in _pages(self.iot.list_attached_policies, "policies",
                                                "marker", "nextMarker", target=target)]


def _check_success(reg: _Registry, outcome: FlowOutcome, prefix: str) -> list[TruthProblem]:
    thing = outcome.thing_name or f"{prefix}-{outcome.serial}"
    cert_id = outcome.certificate_id

    def problem(kind: ProblemKind, detail: str = "") -> TruthProblem:
        return TruthProblem(kind, outcome.serial, thing, cert_id, detail)

    if not reg.thing_exists(thing):
        return [problem(ProblemKind.THING_MISSING)]
    if not cert_id:
        return [problem(ProblemKind.CERTIFICATE_MISSING, "the flow reported no certificate id")]
    cert = reg.certificate(cert_id)
    if cert is None:
        return [problem(ProblemKind.CERTIFICATE_MISSING)]
    arn, status = cert
    found: list[TruthProblem] = []
    if arn not in reg.principals(thing):
        found.append(problem(ProblemKind.CERTIFICATE_NOT_ATTACHED))
    if status != "ACTIVE":
        found.append(problem(ProblemKind.CERTIFICATE_NOT_ACTIVE, f"status {status}"))
    if not reg.policies(arn):
        found.append(problem(ProblemKind.POLICY_MISSING))
    return found


def _active_left(reg: _Registry, outcome: FlowOutcome, prefix: str) -> TruthProblem | None:
    """An ACTIVE certificate a failed (or interrupted) flow left: its own certificate, or
    one attached to the thing the template would have named after its serial."""
    if outcome.certificate_id:
        cert = reg.certificate(outcome.certificate_id)
        if cert is not None and cert[1] == "ACTIVE":
            return TruthProblem(ProblemKind.FAILED_FLOW_LEFT_ACTIVE_CERTIFICATE, outcome.serial,
                                outcome.thing_name, outcome.certificate_id,
                                f"flow failed with {outcome.error_code or 'an interruption'}")
    thing = outcome.thing_name or f"{prefix}-{outcome.serial}"
    if thing in reg.things:
        for arn in reg.principals(thing):
            if reg.status_by_arn.get(arn) == "ACTIVE":
                return TruthProblem(ProblemKind.FAILED_FLOW_LEFT_ACTIVE_CERTIFICATE,
                                    outcome.serial, thing, arn.rsplit("/", 1)[-1],
                                    f"thing registered, flow failed with "
                                    f"{outcome.error_code or 'an interruption'}")
    return None


def check_run(iot: Any, prefix: str, outcomes: Iterable[FlowOutcome], *,
              sample: int | None = None, concurrency: int = 8,
              rng: random.Random | None = None) -> TruthReport:
    """Compare ``outcomes`` (every flow of the run) with what the endpoint holds.

    ``sample`` checks that many successes chosen at random (None or 0: all of them).
    """
    t0 = time.monotonic()
    flows = list(outcomes)
    successes = [o for o in flows if o.ok]
    failures = [o for o in flows if o.failed]
    interrupted = [o for o in flows if o.interrupted]
    checked: Sequence[FlowOutcome] = successes
    if sample and sample < len(successes):
        checked = (rng or random.Random()).sample(successes, sample)
    reg = _Registry(iot, prefix)
    reg.load()
    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="fleetbench-truth") as pool:
        found = list(pool.map(lambda o: _check_success(reg, o, prefix), checked))
        left = list(pool.map(lambda o: _active_left(reg, o, prefix), failures))
        left_interrupted = list(pool.map(lambda o: _active_left(reg, o, prefix), interrupted))
    problems = [p for ps in found for p in ps] + [p for p in left if p is not None]
    report = TruthReport(
        successes=len(successes), checked=len(checked),
        verified=sum(1 for ps in found if not ps), failed_flows=len(failures),
        failed_with_active_certificate=sum(1 for p in left if p is not None),
        interrupted_flows=len(interrupted),
        interrupted_with_active_certificate=sum(1 for p in left_interrupted if p is not None),
        problems=tuple(problems), seconds=time.monotonic() - t0)
    log.info("event=truth_checked verified=%d/%d failed_active=%d/%d seconds=%.1f",
             report.verified, report.checked, report.failed_with_active_certificate,
             report.failed_flows, report.seconds)
    return report
