"""Remove what a run created, in the order AWS requires, and say what could not be removed.

Everything a run creates carries its run prefix (``<prefix>-...``): the template, the
claim and observer policies, groups, types, and the things that devices provisioned
through the template. Certificates and inline policies have no names of their own, so
they are found through what does: the certificates attached to the run's things and to
its policies, and the policies attached to those certificates.

AWS's order (spec broker §5.4): a thing cannot be deleted while principals are attached
(and ``DetachThingPrincipal`` is asynchronous, so the delete is retried); a certificate
must be detached from things and policies and not ``ACTIVE`` before it is deleted; a
policy must be detached from every target and lose its non-default versions first (AWS
may take minutes after ``DetachPolicy``); a thing type must be deprecated, and AWS allows
deleting it only five minutes later. Whatever is still there at the end is reported as a
:class:`Leftover` with the reason, never dropped silently.

Things (and the certificates behind them) are independent of each other, so a sweep
removes them from a small thread pool (:data:`TEARDOWN_WORKERS`; boto3 clients are safe to
call from threads); each thread keeps AWS's order within its own chain (detach, delete
the thing, then deactivate and delete its certificates). On AWS the teardown APIs'
default quota is 10 TPS, so more workers would only meet throttling.

The same code serves every endpoint: it only uses boto3 ``iot`` (and ``iam`` for roles).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from botocore.exceptions import ClientError

from harness.epoch import epoch_seconds

log = logging.getLogger("fleetbench.teardown")

#: How long deletes that AWS makes wait (thing after detach, policy after detach) are retried.
RETRY_TIMEOUT_S = 30.0
#: AWS allows deleting a thing type this long after deprecating it (spec broker §5.4).
THING_TYPE_DELETE_DELAY_S = 300.0
#: Deepest thing-group hierarchy (spec broker §5.4): passes needed to delete children first.
MAX_GROUP_DEPTH = 7
#: Shortest prefix ``cleanup_prefix`` accepts, so that a typo cannot sweep an account.
MIN_PREFIX_LENGTH = 3
#: Threads removing independent things and certificates at once (within botocore's
#: default pool of 10 connections per client).
TEARDOWN_WORKERS = 8


class ResourceKind(str, Enum):
    THING = "thing"
    CERTIFICATE = "certificate"
    POLICY = "policy"
    PROVISIONING_TEMPLATE = "provisioning_template"
    THING_GROUP = "thing_group"
    BILLING_GROUP = "billing_group"
    THING_TYPE = "thing_type"
    ROLE = "iam_role"


@dataclass(frozen=True)
class Resource:
    kind: ResourceKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name}"


@dataclass(frozen=True)
class Leftover:
    """Something the run created that is still there, and why."""

    resource: Resource
    reason: str

    def __str__(self) -> str:
        return f"{self.resource}: {self.reason}"


@dataclass(frozen=True)
class CleanupReport:
    """What a teardown removed and what it left behind."""

    prefix: str
    removed: tuple[Resource, ...] = ()
    leftovers: tuple[Leftover, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.leftovers

    def removed_names(self, kind: ResourceKind) -> list[str]:
        return [r.name for r in self.removed if r.kind is kind]

    def merge(self, other: CleanupReport) -> CleanupReport:
        return CleanupReport(self.prefix, self.removed + other.removed,
                             self.leftovers + other.leftovers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "removed": [{"kind": r.kind.value, "name": r.name} for r in self.removed],
            "leftovers": [{"kind": lo.resource.kind.value, "name": lo.resource.name,
                           "reason": lo.reason} for lo in self.leftovers],
        }

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.removed:
            counts[r.kind.value] = counts.get(r.kind.value, 0) + 1
        removed = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
        lines = [f"cleanup {self.prefix}: removed {removed}"]
        if self.leftovers:
            lines.append(f"LEFTOVERS ({len(self.leftovers)}), remove with "
                         f"`fleetbench cleanup --prefix {self.prefix}`:")
            lines += [f"  {lo}" for lo in self.leftovers]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def owned(name: str, prefix: str) -> bool:
    """Whether ``name`` belongs to the run ``prefix`` (``prefix`` or ``prefix-...``)."""
    return name == prefix or name.startswith(prefix + "-")


def _code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "ClientError"))
    return type(exc).__name__


def _message(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _not_found(exc: BaseException) -> bool:
    return _code(exc) in ("ResourceNotFoundException", "NoSuchEntity", "NoSuchEntityException")


@dataclass
class Teardown:
    """One cleanup pass over an account; collects a :class:`CleanupReport`.

    Each public method removes one resource with everything that blocks its deletion
    and never raises for AWS errors: a failure becomes a leftover. The methods may run in
    several threads at once (:meth:`sweep` does, with ``workers`` threads); the
    bookkeeping is shared under a lock.
    """

    iot: Any
    prefix: str
    iam: Any = None
    retry_timeout: float = RETRY_TIMEOUT_S
    sleep: Callable[[float], None] = time.sleep
    workers: int = TEARDOWN_WORKERS
    #: Insertion-ordered (the report lists removals in order) and O(1) to test: a load
    #: run's teardown removes tens of thousands of resources (a list made it quadratic).
    _removed: dict[Resource, None] = field(default_factory=dict)
    _leftovers: dict[Resource, str] = field(default_factory=dict)
    _done: set[Resource] = field(default_factory=set)
    _orphan_policies: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- bookkeeping --------------------------------------------------------------------------
    def report(self) -> CleanupReport:
        with self._lock:
            return CleanupReport(self.prefix, tuple(self._removed),
                                 tuple(Leftover(r, why) for r, why in self._leftovers.items()))

    def _ok(self, resource: Resource) -> None:
        with self._lock:
            self._leftovers.pop(resource, None)
            self._removed.setdefault(resource, None)
        log.info("event=removed %s=%s", resource.kind.value, resource.name)

    def _left(self, resource: Resource, reason: str) -> None:
        with self._lock:
            self._leftovers[resource] = reason
        log.warning("event=leftover %s=%s reason=%s", resource.kind.value, resource.name, reason)

    def _first_visit(self, resource: Resource) -> bool:
        with self._lock:
            if resource in self._done:
                return False
            self._done.add(resource)
            return True

    def _was_removed(self, resource: Resource) -> bool:
        with self._lock:
            return resource in self._removed

    def _each(self, remove: Callable[[str], None], names: Iterable[str]) -> None:
        """``remove(name)`` for every name, ``workers`` at a time (each one's own chain in
        AWS's order); returns when all are done. Errors other than AWS's propagate."""
        todo = list(names)
        if self.workers <= 1 or len(todo) <= 1:
            for name in todo:
                remove(name)
            return
        with ThreadPoolExecutor(max_workers=min(self.workers, len(todo)),
                                thread_name_prefix="fleetbench-teardown") as pool:
            for future in [pool.submit(remove, name) for name in todo]:
                future.result()

    def _pages(self, operation: str, key: str, **kwargs: Any) -> Iterator[Any]:
        if self.iot.can_paginate(operation):
            for page in self.iot.get_paginator(operation).paginate(**kwargs):
                yield from page.get(key, [])
        else:
            yield from getattr(self.iot, operation)(**kwargs).get(key, [])

    def _listing(self, kind: ResourceKind, operation: str, key: str,
                 **kwargs: Any) -> list[Any]:
        """All items of a listing; a listing that fails is itself reported."""
        try:
            return list(self._pages(operation, key, **kwargs))
        except Exception as exc:  # includes endpoints lacking the operation
            self._left(Resource(kind, f"{self.prefix}-*"), f"could not list ({operation}): "
                       f"{_message(exc)}")
            return []

    def _retrying(self, call: Callable[[], Any], retry_codes: Iterable[str]) -> None:
        """Call, retrying the codes AWS returns while an earlier detach propagates."""
        codes = set(retry_codes)
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.2
        while True:
            try:
                call()
                return
            except ClientError as exc:
                if _code(exc) not in codes or time.monotonic() + delay > deadline:
                    raise
            self.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- things and certificates --------------------------------------------------------------
    def thing(self, name: str) -> None:
        """Detach and delete the thing's certificates (and their policies), then the thing."""
        resource = Resource(ResourceKind.THING, name)
        if not self._first_visit(resource):
            return
        try:
            principals = list(self._pages("list_thing_principals", "principals", thingName=name))
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, f"could not list its principals: {_message(exc)}")
            return
        for arn in principals:
            try:
                self.iot.detach_thing_principal(thingName=name, principal=arn)
            except Exception as exc:
                if not _not_found(exc):
                    self._left(resource, f"could not detach {arn}: {_message(exc)}")
                    return
        try:
            self._retrying(lambda: self.iot.delete_thing(thingName=name),
                           ("InvalidRequestException",))
            self._ok(resource)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))
        for arn in principals:
            if ":cert/" in arn:
                self.certificate(arn.rsplit("/", 1)[1])

    def certificate(self, certificate_id: str) -> None:
        """Detach from things and policies, deactivate, delete (spec broker §2.3, §5.4)."""
        resource = Resource(ResourceKind.CERTIFICATE, certificate_id)
        if not self._first_visit(resource):
            return
        try:
            desc = self.iot.describe_certificate(certificateId=certificate_id)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))
            return
        description = desc["certificateDescription"]
        arn = description["certificateArn"]
        try:
            for thing in list(self._pages("list_principal_things", "things", principal=arn)):
                if not owned(thing, self.prefix):
                    self._left(resource, f"attached to thing {thing}, which is not the run's")
                    return
                self.iot.detach_thing_principal(thingName=thing, principal=arn)
            for policy in list(self._pages("list_attached_policies", "policies", target=arn)):
                self.iot.detach_policy(policyName=policy["policyName"], target=arn)
                if not owned(policy["policyName"], self.prefix):
                    with self._lock:
                        self._orphan_policies.add(policy["policyName"])
            if description.get("status") == "ACTIVE":
                self.iot.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
            self._retrying(lambda: self.iot.delete_certificate(certificateId=certificate_id),
                           ("DeleteConflictException",))
            self._ok(resource)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))

    # -- policies -----------------------------------------------------------------------------
    def policy(self, name: str, *, delete_certificates: bool = True) -> None:
        """Detach the policy everywhere (deleting the run's certificates behind it), then delete.

        Certificates attached to a run-prefixed policy are the run's own claim and
        observer certificates, which have no names: this is how they are found.
        """
        resource = Resource(ResourceKind.POLICY, name)
        if not self._first_visit(resource):
            return
        try:
            for target in list(self._pages("list_targets_for_policy", "targets",
                                           policyName=name)):
                if ":cert/" in target and delete_certificates:
                    cert = Resource(ResourceKind.CERTIFICATE, target.rsplit("/", 1)[1])
                    self.certificate(cert.name)
                    if self._was_removed(cert):
                        continue  # detached on the way
                self._detach(name, target)
        except Exception as exc:
            if _not_found(exc):
                return
            self._left(resource, f"could not detach it: {_message(exc)}")
            return
        self._delete_policy(resource)

    def _detach(self, policy_name: str, target: str) -> None:
        try:
            self.iot.detach_policy(policyName=policy_name, target=target)
        except Exception as exc:
            if not _not_found(exc):
                raise

    def _delete_policy(self, resource: Resource) -> None:
        name = resource.name
        try:
            for version in self.iot.list_policy_versions(policyName=name)["policyVersions"]:
                if not version.get("isDefaultVersion"):
                    self.iot.delete_policy_version(policyName=name,
                                                   policyVersionId=version["versionId"])
            self._retrying(lambda: self.iot.delete_policy(policyName=name),
                           ("DeleteConflictException",))
            self._ok(resource)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))

    def orphaned_policies(self) -> None:
        """Delete inline policies (hash-named) the run's certificates used, once nothing uses them.

        Such a policy still attached elsewhere is shared with something outside the run
        and is left alone (not a leftover of this run).
        """
        with self._lock:
            orphans = sorted(self._orphan_policies)
        self._each(self._orphaned_policy, orphans)

    def _orphaned_policy(self, name: str) -> None:
        resource = Resource(ResourceKind.POLICY, name)
        if not self._first_visit(resource):
            return
        try:
            targets = list(self._pages("list_targets_for_policy", "targets", policyName=name))
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))
            return
        if not targets:
            self._delete_policy(resource)

    # -- the rest -----------------------------------------------------------------------------
    def template(self, name: str) -> None:
        resource = Resource(ResourceKind.PROVISIONING_TEMPLATE, name)
        if not self._first_visit(resource):
            return
        try:
            self.iot.delete_provisioning_template(templateName=name)
            self._ok(resource)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))

    def thing_groups(self, names: Iterable[str]) -> None:
        """Delete groups, children before parents (retrying in passes)."""
        pending = [n for n in dict.fromkeys(names)
                   if self._first_visit(Resource(ResourceKind.THING_GROUP, n))]
        for _ in range(MAX_GROUP_DEPTH + 1):
            if not pending:
                return
            failed: list[str] = []
            for name in pending:
                resource = Resource(ResourceKind.THING_GROUP, name)
                try:
                    self.iot.delete_thing_group(thingGroupName=name)
                    self._ok(resource)
                except Exception as exc:
                    if not _not_found(exc):
                        self._left(resource, _message(exc))
                        failed.append(name)
            if len(failed) == len(pending):
                return
            pending = failed

    def billing_group(self, name: str) -> None:
        resource = Resource(ResourceKind.BILLING_GROUP, name)
        if not self._first_visit(resource):
            return
        try:
            self.iot.delete_billing_group(billingGroupName=name)
            self._ok(resource)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))

    def thing_type(self, name: str) -> None:
        """Deprecate, then delete; AWS refuses the delete for five minutes after deprecation."""
        resource = Resource(ResourceKind.THING_TYPE, name)
        if not self._first_visit(resource):
            return
        deprecated_at: float | None = None
        try:
            meta = self.iot.describe_thing_type(thingTypeName=name).get("thingTypeMetadata", {})
            if not meta.get("deprecated"):
                self.iot.deprecate_thing_type(thingTypeName=name, undoDeprecate=False)
                deprecated_at = time.time()
            else:
                deprecated_at = epoch_seconds(meta.get("deprecationDate"))
            self.iot.delete_thing_type(thingTypeName=name)
            self._ok(resource)
        except Exception as exc:
            if _not_found(exc):
                return
            reason = _message(exc)
            if deprecated_at is not None and _code(exc) == "InvalidRequestException":
                ready = dt.datetime.fromtimestamp(deprecated_at + THING_TYPE_DELETE_DELAY_S,
                                                  dt.timezone.utc)
                reason += f" (deprecated; AWS allows deleting it after {ready:%H:%M:%S} UTC)"
            self._left(resource, reason)

    def role(self, name: str) -> None:
        """Detach managed policies, delete inline ones, delete the role (IAM)."""
        resource = Resource(ResourceKind.ROLE, name)
        if self.iam is None or not self._first_visit(resource):
            return
        try:
            for page in self.iam.get_paginator("list_attached_role_policies").paginate(
                    RoleName=name):
                for attached in page.get("AttachedPolicies", []):
                    self.iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
            for page in self.iam.get_paginator("list_role_policies").paginate(RoleName=name):
                for policy_name in page.get("PolicyNames", []):
                    self.iam.delete_role_policy(RoleName=name, PolicyName=policy_name)
            self.iam.delete_role(RoleName=name)
            self._ok(resource)
        except Exception as exc:
            if not _not_found(exc):
                self._left(resource, _message(exc))

    # -- sweeps by prefix ---------------------------------------------------------------------
    def sweep(self, *, certificates: Iterable[str] = (), templates: Iterable[str] = (),
              roles: Iterable[str] = ()) -> CleanupReport:
        """Everything named with the prefix, plus the given certificates, templates and roles."""
        p = self.prefix
        things = [t["thingName"] for t in self._listing(ResourceKind.THING, "list_things",
                                                        "things")
                  if owned(t["thingName"], p)]
        self._each(self.thing, things)
        self._each(self.certificate, certificates)
        listed = [t["templateName"] for t in self._listing(
            ResourceKind.PROVISIONING_TEMPLATE, "list_provisioning_templates", "templates")]
        for name in dict.fromkeys([*templates, *(n for n in listed if owned(n, p))]):
            self.template(name)
        for policy in self._listing(ResourceKind.POLICY, "list_policies", "policies"):
            if owned(policy["policyName"], p):
                self.policy(policy["policyName"])
        self.orphaned_policies()
        self.thing_groups(g["groupName"] for g in self._listing(
            ResourceKind.THING_GROUP, "list_thing_groups", "thingGroups", namePrefixFilter=p)
            if owned(g["groupName"], p))
        for group in self._listing(ResourceKind.BILLING_GROUP, "list_billing_groups",
                                   "billingGroups", namePrefixFilter=p):
            if owned(group["groupName"], p):
                self.billing_group(group["groupName"])
        for thing_type in self._listing(ResourceKind.THING_TYPE, "list_thing_types",
                                        "thingTypes"):
            if owned(thing_type["thingTypeName"], p):
                self.thing_type(thing_type["thingTypeName"])
        if self.iam is not None:
            names = list(roles)
            try:
                for page in self.iam.get_paginator("list_roles").paginate():
                    names += [r["RoleName"] for r in page.get("Roles", [])
                              if owned(r["RoleName"], p)]
            except Exception as exc:
                self._left(Resource(ResourceKind.ROLE, f"{p}-*"),
                           f"could not list roles: {_message(exc)}")
            for name in dict.fromkeys(names):
                self.role(name)
        return self.report()


def cleanup_prefix(iot: Any, prefix: str, *, iam: Any = None,
                   certificates: Iterable[str] = (),
                   retry_timeout: float = RETRY_TIMEOUT_S) -> CleanupReport:
    """Remove every resource named ``<prefix>`` or ``<prefix>-...`` (a crashed run's leftovers).

    Also removes the certificates attached to those things and policies, the inline
    policies those certificates used once nothing else uses them, and ``certificates``
    given explicitly (for example ones devices created but never registered). With
    ``iam``, IAM roles named with the prefix too.
    """
    if len(prefix) < MIN_PREFIX_LENGTH:
        raise ValueError(f"refusing a prefix shorter than {MIN_PREFIX_LENGTH} characters: "
                         f"{prefix!r}")
    return Teardown(iot, prefix, iam=iam, retry_timeout=retry_timeout).sweep(
        certificates=certificates)
