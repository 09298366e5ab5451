"""Hypothesis tests of the registry: a state machine over things, certificates, policies and
their attachments against a small reference model (no dangling attachments; memory equals a
reload from disk), and pagination properties."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from harness import pki
from harness.emulator.registry import CertificateStatus, Registry
from harness.errors import (
    AwsError,
    CertificateStateException,
    DeleteConflictException,
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
)
from tests.test_registry_kit import ALLOW_ALL, device_pem, emulator_ca, make_registry, reopen

THINGS = ("t0", "t1", "t2")
POLICIES = ("p0", "p1")
CERT_PEMS = tuple(device_pem(emulator_ca(), f"device {n}") for n in range(4))
CERT_IDS = tuple(pki.certificate_id(p) for p in CERT_PEMS)
CERTS = st.integers(0, len(CERT_PEMS) - 1)


class Rollback(Exception):
    """Raised on purpose to abandon a transaction."""


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="registry-sm-"))
        self.path = self.dir / "registry.db"
        self.registry = make_registry(self.path)
        self.things: set[str] = set()
        self.certs: dict[int, CertificateStatus] = {}
        self.policies: set[str] = set()
        self.thing_principals: set[tuple[str, int]] = set()
        self.policy_targets: set[tuple[str, int]] = set()

    def arn(self, cert: int) -> str:
        return self.registry.arn("cert", CERT_IDS[cert])

    def expect(self, error: type[AwsError] | None, call: Callable[[], Any]) -> bool:
        """Run ``call``; it must raise ``error`` (or succeed when None). True on success."""
        if error is None:
            call()
            return True
        try:
            call()
        except error:
            return False
        raise AssertionError(f"expected {error.__name__}")

    # -- things --------------------------------------------------------------------------------
    @rule(name=st.sampled_from(THINGS))
    def create_thing(self, name: str) -> None:
        self.registry.create_thing(thing_name=name)
        self.things.add(name)

    @rule(name=st.sampled_from(THINGS))
    def delete_thing(self, name: str) -> None:
        attached = any(t == name for t, _ in self.thing_principals)
        if self.expect(InvalidRequestException if attached else None,
                       lambda: self.registry.delete_thing(thing_name=name)):
            self.things.discard(name)

    # -- certificates --------------------------------------------------------------------------
    @rule(cert=CERTS)
    def insert_certificate(self, cert: int) -> None:
        exists = cert in self.certs
        if self.expect(ResourceAlreadyExistsException if exists else None,
                       lambda: self.registry.insert_certificate(
                           CERT_PEMS[cert], status=CertificateStatus.INACTIVE)):
            self.certs[cert] = CertificateStatus.INACTIVE

    @rule(cert=CERTS, status=st.sampled_from([CertificateStatus.ACTIVE,
                                              CertificateStatus.INACTIVE]))
    def update_certificate(self, cert: int, status: CertificateStatus) -> None:
        missing = cert not in self.certs
        if self.expect(ResourceNotFoundException if missing else None,
                       lambda: self.registry.update_certificate(certificate_id=CERT_IDS[cert],
                                                                new_status=status.value)):
            self.certs[cert] = status

    @rule(cert=CERTS, force=st.booleans())
    def delete_certificate(self, cert: int, force: bool) -> None:
        error: type[AwsError] | None = None
        if cert not in self.certs:
            error = ResourceNotFoundException
        elif self.certs[cert] is CertificateStatus.ACTIVE:
            error = CertificateStateException
        elif (any(c == cert for _, c in self.thing_principals)
              or (not force and any(c == cert for _, c in self.policy_targets))):
            error = DeleteConflictException
        if self.expect(error, lambda: self.registry.delete_certificate(
                certificate_id=CERT_IDS[cert], force_delete=force)):
            del self.certs[cert]
            self.policy_targets = {(p, c) for p, c in self.policy_targets if c != cert}

    # -- policies ------------------------------------------------------------------------------
    @rule(name=st.sampled_from(POLICIES))
    def create_policy(self, name: str) -> None:
        exists = name in self.policies
        if self.expect(ResourceAlreadyExistsException if exists else None,
                       lambda: self.registry.create_policy(policy_name=name,
                                                           policy_document=ALLOW_ALL)):
            self.policies.add(name)

    @rule(name=st.sampled_from(POLICIES))
    def delete_policy(self, name: str) -> None:
        error: type[AwsError] | None = None
        if name not in self.policies:
            error = ResourceNotFoundException
        elif any(p == name for p, _ in self.policy_targets):
            error = DeleteConflictException
        if self.expect(error, lambda: self.registry.delete_policy(policy_name=name)):
            self.policies.discard(name)

    # -- attachments ---------------------------------------------------------------------------
    @rule(thing=st.sampled_from(THINGS), cert=CERTS)
    def attach_thing_principal(self, thing: str, cert: int) -> None:
        missing = thing not in self.things or cert not in self.certs
        if self.expect(ResourceNotFoundException if missing else None,
                       lambda: self.registry.attach_thing_principal(thing_name=thing,
                                                                    principal=self.arn(cert))):
            self.thing_principals.add((thing, cert))

    @rule(thing=st.sampled_from(THINGS), cert=CERTS)
    def detach_thing_principal(self, thing: str, cert: int) -> None:
        missing = thing not in self.things
        if self.expect(ResourceNotFoundException if missing else None,
                       lambda: self.registry.detach_thing_principal(thing_name=thing,
                                                                    principal=self.arn(cert))):
            self.thing_principals.discard((thing, cert))

    @rule(policy=st.sampled_from(POLICIES), cert=CERTS)
    def attach_policy(self, policy: str, cert: int) -> None:
        missing = policy not in self.policies or cert not in self.certs
        if self.expect(ResourceNotFoundException if missing else None,
                       lambda: self.registry.attach_policy(policy_name=policy,
                                                           target=self.arn(cert))):
            self.policy_targets.add((policy, cert))

    @rule(policy=st.sampled_from(POLICIES), cert=CERTS)
    def detach_policy(self, policy: str, cert: int) -> None:
        self.registry.detach_policy(policy_name=policy, target=self.arn(cert))
        self.policy_targets.discard((policy, cert))

    # -- transactions --------------------------------------------------------------------------
    @rule(thing=st.sampled_from(THINGS), cert=CERTS, policy=st.sampled_from(POLICIES))
    def abandoned_transaction(self, thing: str, cert: int, policy: str) -> None:
        before = self.registry.dump()
        try:
            with self.registry.transaction() as tx:
                for call in (
                    lambda: tx.create_thing(thing_name=thing),
                    lambda: tx.insert_certificate(CERT_PEMS[cert],
                                                  status=CertificateStatus.ACTIVE),
                    lambda: tx.attach_thing_principal(thing_name=thing, principal=self.arn(cert)),
                    lambda: tx.create_policy(policy_name=policy, policy_document=ALLOW_ALL),
                    lambda: tx.attach_policy(policy_name=policy, target=self.arn(cert)),
                ):
                    try:
                        call()
                    except AwsError:
                        pass
                raise Rollback
        except Rollback:
            pass
        assert self.registry.dump() == before

    @rule(thing=st.sampled_from(THINGS), cert=CERTS)
    def committed_transaction(self, thing: str, cert: int) -> None:
        if cert not in self.certs:
            return
        with self.registry.transaction() as tx:
            tx.create_thing(thing_name=thing)
            tx.attach_thing_principal(thing_name=thing, principal=self.arn(cert))
        self.things.add(thing)
        self.thing_principals.add((thing, cert))

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def registry_matches_the_model(self) -> None:
        dump = self.registry.dump()
        ids = {cid: n for n, cid in enumerate(CERT_IDS)}
        assert set(dump["things"]) == self.things
        assert {ids[c]: r.status for c, r in dump["certificates"].items()} == self.certs
        assert set(dump["policies"]) == self.policies
        assert {(t, ids[p.rsplit("/", 1)[1]]) for t, p in dump["thing_principals"]} == \
            self.thing_principals
        assert {(p, ids[t.rsplit("/", 1)[1]]) for p, t in dump["policy_targets"]} == \
            self.policy_targets

    @invariant()
    def no_dangling_attachments(self) -> None:
        dump = self.registry.dump()
        arns = {c.certificate_arn for c in dump["certificates"].values()}
        for thing, principal in dump["thing_principals"]:
            assert thing in dump["things"] and principal in arns
        for policy, target in dump["policy_targets"]:
            assert policy in dump["policies"] and target in arns
        for name, policy in dump["policies"].items():
            assert (name, policy.default_version_id) in dump["policy_versions"]

    def teardown(self) -> None:
        memory = self.registry.dump()
        again = reopen(self.registry, self.path)
        try:
            assert again.dump() == memory
        finally:
            again.close()
            shutil.rmtree(self.dir, ignore_errors=True)


RegistryMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestRegistryMachine = RegistryMachine.TestCase


@settings(max_examples=20, deadline=None)
@given(names=st.sets(st.text("abc123", min_size=1, max_size=6), max_size=12),
       size=st.integers(1, 5))
def test_token_pages_cover_every_thing_once_in_order(names: set[str], size: int) -> None:
    # spec broker §5.1: nextToken/maxResults pagination
    directory = Path(tempfile.mkdtemp(prefix="registry-pages-"))
    registry: Registry = make_registry(directory / "r.db")
    try:
        for name in names:
            registry.create_thing(thing_name=name)
        seen: list[str] = []
        token = None
        while True:
            page = registry.list_things(max_results=size, next_token=token)
            assert len(page.things) <= size
            seen += [t.thing_name for t in page.things]
            token = page.next_token
            if token is None:
                break
        assert seen == sorted(names)
    finally:
        registry.close()
        shutil.rmtree(directory, ignore_errors=True)
