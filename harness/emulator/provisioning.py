"""The fleet provisioning service of the emulator (spec fleet-provisioning.md §1, §2, §4).

It plugs the device MQTT API into the broker's reserved-topic mechanism: a PUBLISH on
``$aws/certificates/create/<fmt>``, ``$aws/certificates/create-from-csr/<fmt>`` or
``$aws/provisioning-templates/<name>/provision/<fmt>`` that the caller's policy
allowed reaches :meth:`ProvisioningService.handle`, and the answer goes back on the
matching ``accepted``/``rejected`` topic to that connection only (the broker's
``reply``), encoded like the request (§1.1). One method per operation
(:meth:`~ProvisioningService.create_keys_and_certificate`,
:meth:`~ProvisioningService.create_certificate_from_csr`,
:meth:`~ProvisioningService.register_thing`,
:meth:`~ProvisioningService.create_provisioning_claim`); rejections are
:class:`~harness.errors.ProvisioningError` from :mod:`harness.protocol`'s factories,
rendered once in :meth:`~ProvisioningService.handle`.

Nothing here blocks the loop: RSA keys come from :class:`~harness.emulator.keypool.KeyPool`,
hooks run through the :class:`~harness.emulator.hooks.HookRunner`, and registry writes go
to the :class:`~harness.emulator.registry.writer.RegistryWriter` thread, which commits the
writes of several requests together (one hop per request, the minimum: a reply waits for
its commit). CSR checks, signing (an EC CA: ~0.3 ms together) and template evaluation
(~0.05 ms) are pure CPU work and run on the loop: a thread in the same process would not
make them cheaper, only add a hop. A RegisterThing is committed in one registry
transaction before ``accepted`` is published.

Emulator guesses (UNCONFIRMED in the spec), each a field of :class:`ProvisioningSettings`
or a named constant (see also :mod:`.tokens`, :mod:`.claims`, :mod:`.provisioning_plan`):

* a token is bound to the account only: any authorised connection may present it (§1.6);
  reuse after a successful RegisterThing is refused with 400
  ``InvalidCertificateOwnershipToken``, as are unknown, malformed and expired tokens and
  tokens whose certificate left ``PENDING_ACTIVATION`` or was deleted;
* a connection made with a trusted-user claim gets 403 ``AccessDenied`` on any of the
  three operations once five minutes have passed since it connected (§2.2);
* a template whose hook ARN maps to no local target is refused with 403 ``AccessDenied``
  naming the ARN (emulator-only situation; AWS has no unmapped Lambdas);
* CreateCertificateFromCsr copies the CSR's subject (§1.3) unless it is empty;
* a request on a ``+`` format segment other than ``json``/``cbor`` gets no answer (there
  is no reply topic to answer on);
* expired unused certificates are swept every :attr:`ProvisioningSettings.sweep_interval`
  seconds and at once when the clock is advanced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509

from harness import pki, protocol
from harness.clock import Clock
from harness.emulator.claims import (
    CLAIM_LIFETIME_SECONDS,
    CLAIM_PRINCIPAL_KIND,
    CLAIM_REGISTRATION_WINDOW_SECONDS,
    ClaimStore,
    ProvisioningClaim,
)
from harness.emulator.hooks import REASON_NO_TARGET, HookInput, HookRunner
from harness.emulator.keypool import KeyPool
from harness.emulator.provisioning_plan import PlanApplier, refused
from harness.emulator.registry import CertificateStatus, Registry, TemplateType
from harness.emulator.registry.certificates import parse_csr
from harness.emulator.registry.writer import RegistryWriter
from harness.emulator.templates import (
    ProvisioningPlan,
    certificate_parameters,
    evaluate,
    merge_hook_overrides,
)
from harness.emulator.tokens import (
    TOKEN_LIFETIME_SECONDS,
    TokenAuthority,
    TokenContents,
    TokenError,
)
from harness.errors import (
    AwsError,
    InvalidRequestException,
    ProvisioningError,
    ResourceNotFoundException,
)
from harness.observations import Kind, ObservationLog
from harness.protocol import (
    Api,
    CreateCertificateFromCsrRequest,
    CreateCertificateFromCsrResponse,
    CreateKeysAndCertificateResponse,
    ErrorResponse,
    ParsedTopic,
    RegisterThingRequest,
    RegisterThingResponse,
)

if TYPE_CHECKING:
    from harness.emulator.faults import FaultInjector
    from harness.emulator.mqtt.server import ApiRequest, Broker
    from harness.emulator.quotas import QuotaEnforcer
    from harness.emulator.registry.results import TemplateDescription

log = logging.getLogger("fleetbench.provisioning")

T = TypeVar("T")

#: ``detail["source"]`` of the service's API_RESPONSE observations (the broker records its
#: own API_REQUEST on receipt and API_RESPONSE on delivery).
OBSERVATION_SOURCE = "provisioning"


@dataclass(frozen=True)
class ProvisioningSettings:
    """The service's limits and guesses (defaults: the spec's values and suggestions)."""

    #: §1.6: RegisterThing within one hour; unused certificates are deleted after it.
    token_lifetime: float = TOKEN_LIFETIME_SECONDS
    #: §2.2: a trusted-user claim is valid five minutes.
    claim_lifetime: float = CLAIM_LIFETIME_SECONDS
    #: §2.2: a claim connection must finish within five minutes of connecting (UNCONFIRMED
    #: that every operation is refused afterwards; this service refuses all three).
    claim_registration_window: float = CLAIM_REGISTRATION_WINDOW_SECONDS
    #: Seconds between expiry sweeps (they also run whenever the clock is advanced).
    sweep_interval: float = 30.0
    #: §1.3 UNCONFIRMED: certificates from CreateCertificateFromCsr carry the CSR's subject.
    csr_subject_from_csr: bool = True


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the connection's client id and certificate, and whether that
    certificate is a temporary claim (then ``connected_at`` starts its five minutes)."""

    client_id: str
    certificate_id: str
    principal_kind: str = "certificate"
    connected_at: float | None = None

    @property
    def is_claim(self) -> bool:
        return self.principal_kind == CLAIM_PRINCIPAL_KIND


@dataclass(frozen=True)
class _Issued:
    certificate_id: str
    certificate_pem: str
    created_at: float


class ProvisioningService:
    """CreateKeysAndCertificate, CreateCertificateFromCsr, RegisterThing and
    CreateProvisioningClaim for one emulated account."""

    def __init__(
        self,
        *,
        registry: Registry,
        broker: Broker,
        ca: pki.CertificateAuthority,
        clock: Clock,
        observations: ObservationLog,
        hooks: HookRunner,
        executor: Executor,
        region: str,
        account_id: str,
        key_pool_size: int = 32,
        key_pool_workers: int = 1,
        data_dir: Path | None = None,
        settings: ProvisioningSettings | None = None,
        quotas: QuotaEnforcer | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        self.registry = registry
        self.broker = broker
        self.ca = ca
        self.clock = clock
        self.observations = observations
        self.hooks = hooks
        self.executor = executor
        self.region = region
        self.account_id = account_id
        self.settings = settings or ProvisioningSettings()
        self.quotas = quotas  # issue 10: per-API token buckets (429 ThrottlingException)
        self.faults = faults  # issue 10: fault decision points around each request
        self.keys = KeyPool(key_pool_size, key_pool_workers, observations=observations)
        self.writer = RegistryWriter(registry)
        if data_dir is not None:
            self.tokens = TokenAuthority.load_or_create(
                data_dir, account_id=account_id, lifetime=self.settings.token_lifetime)
        else:
            log.warning("event=ephemeral_token_key reason=no_data_dir "
                        "(ownership tokens will not survive a restart)")
            self.tokens = TokenAuthority.ephemeral(account_id=account_id,
                                                   lifetime=self.settings.token_lifetime)
        self.claims = ClaimStore(ca=ca, clock=clock, keys=self.keys, region=region,
                                 account_id=account_id, lifetime=self.settings.claim_lifetime)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_lock = threading.Lock()
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the key workers, register the API handlers and the claim resolver with the
        broker (before it listens), and start the expiry sweeper."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.writer.start()
        self.keys.start()
        for topic_filter in protocol.REQUEST_FILTERS:
            self.broker.register_api(topic_filter, self.handle)
        self.broker.add_principal_resolver(self.claims.resolve)
        self.registry.add_listener(self._registry_event)
        self.clock.on_advance(self._clock_advanced)
        self._sweeper = self._loop.create_task(self._sweep_periodically())

    async def stop(self) -> None:
        self._stopped = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        await self.keys.stop()
        await self._off_loop(self.writer.stop)  # what was queued is committed first

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    # -- the broker's entry point ------------------------------------------------------------
    async def handle(self, request: ApiRequest) -> None:
        """Answer one API request from the broker (an ``ApiRequest``)."""
        started = time.perf_counter()
        parsed = protocol.parse_topic(request.topic)
        if parsed is None or parsed.suffix is not None:
            log.info("event=api_unrecognised topic=%s client_id=%s", request.topic,
                     request.client_id)
            return
        caller = self._caller(request)
        fault = self.faults.on_request(parsed.api.value, client_id=caller.client_id,
                                       certificate_id=caller.certificate_id,
                                       template=parsed.template_name) \
            if self.faults is not None else None
        if fault is not None and await fault.before():  # disconnected, broker restarting
            return
        refusal = fault.rejection if fault is not None else None
        if refusal is None and self.quotas is not None:
            refusal = self.quotas.check_mqtt(parsed.api.value, client_id=caller.client_id,
                                             certificate_id=caller.certificate_id,
                                             received_at=request.received_at)
        response: protocol.Response | ErrorResponse
        try:
            if refusal is not None:
                raise refusal
            response = await self.dispatch(parsed, caller, request.payload)
        except ProvisioningError as error:
            response = ErrorResponse.from_error(error)
        except Exception:
            log.exception("event=api_failed api=%s client_id=%s", parsed.api.value,
                          caller.client_id)
            response = ErrorResponse.from_error(protocol.internal_error())
        ok = not isinstance(response, ErrorResponse)
        topic = protocol.accepted(request.topic) if ok else protocol.rejected(request.topic)
        detail: dict[str, Any] = {
            "source": OBSERVATION_SOURCE,
            "api": parsed.api.value,
            "format": parsed.fmt.value,
            "template": parsed.template_name,
            "result": "accepted" if ok else "rejected",
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if isinstance(response, ErrorResponse):
            detail.update(statusCode=response.status_code, errorCode=response.error_code,
                          errorMessage=response.error_message)
        self.observations.record(Kind.API_RESPONSE, client_id=caller.client_id,
                                 certificate_id=caller.certificate_id, **detail)
        if fault is not None and not await fault.after():  # answer dropped or cut off
            return
        try:
            await request.reply(topic, protocol.encode(response, parsed.fmt))
        except Exception:  # the connection went away meanwhile: nothing to tell anyone
            log.info("event=api_reply_failed topic=%s client_id=%s", topic, caller.client_id)

    async def dispatch(self, parsed: ParsedTopic, caller: Caller,
                       payload: bytes) -> protocol.Response:
        """Parse ``payload`` for ``parsed.api`` and run the operation; raises
        :class:`ProvisioningError` for every rejection."""
        self._check_claim_window(caller)  # before anything about the request itself
        message = protocol.parse_request(parsed.api, payload, parsed.fmt)
        if parsed.api is Api.CREATE_KEYS_AND_CERTIFICATE:
            return await self.create_keys_and_certificate(caller)
        if parsed.api is Api.CREATE_CERTIFICATE_FROM_CSR:
            assert isinstance(message, CreateCertificateFromCsrRequest)
            return await self.create_certificate_from_csr(caller, message)
        assert isinstance(message, RegisterThingRequest) and parsed.template_name is not None
        return await self.register_thing(caller, parsed.template_name, message)

    def _caller(self, request: ApiRequest) -> Caller:
        kind = request.principal.kind
        connected_at: float | None = getattr(request, "connected_at", None)
        if kind == CLAIM_PRINCIPAL_KIND and connected_at is None:
            connected_at = self._connected_at(request.client_id, request.certificate_id)
        return Caller(request.client_id, request.certificate_id, kind, connected_at)

    def _connected_at(self, client_id: str, certificate_id: str) -> float | None:
        for info in self.broker.connections():
            if info.client_id == client_id and info.certificate_id == certificate_id:
                return float(info.since)
        return None

    def _check_claim_window(self, caller: Caller) -> None:
        """§2.2: a claim connection has five minutes from connecting."""
        if not caller.is_claim:
            return
        started = caller.connected_at
        if started is None:  # not found: count from the claim's issue, the earliest possible
            claim = self.claims.get(caller.certificate_id)
            started = claim.issued_at if claim is not None else None
        if started is None or self.clock.now() > started + self.settings.claim_registration_window:
            raise protocol.claim_window_passed()

    # -- CreateKeysAndCertificate (§1.2) -----------------------------------------------------
    async def create_keys_and_certificate(self, caller: Caller
                                          ) -> CreateKeysAndCertificateResponse:
        """A new RSA-2048 key pair from the pool and a PENDING_ACTIVATION certificate."""
        self._check_claim_window(caller)
        key = await self.keys.take()
        issued = await self._store(self.ca.issue_device_certificate(key.public_key()))
        token = self._token_for(issued, caller, Api.CREATE_KEYS_AND_CERTIFICATE)
        return CreateKeysAndCertificateResponse(
            certificate_id=issued.certificate_id,
            certificate_pem=issued.certificate_pem,
            private_key=key.private_key_pem,
            certificate_ownership_token=token,
        )

    async def _store(self, cert: x509.Certificate) -> _Issued:
        """Commit a new PENDING_ACTIVATION certificate (through the writer thread)."""
        def insert(registry: Registry) -> _Issued:
            record = registry.insert_certificate(
                cert, status=CertificateStatus.PENDING_ACTIVATION, owned_by_provisioning=True)
            return _Issued(record.certificate_id, record.certificate_pem, record.creation_date)

        try:
            return await self.writer.run(insert)
        except AwsError as error:
            raise refused(error) from None

    def _token_for(self, issued: _Issued, caller: Caller, api: Api) -> str:
        self.observations.record(Kind.CERTIFICATE_CREATED, client_id=caller.client_id,
                                 certificate_id=issued.certificate_id, api=api.value,
                                 claimCertificateId=caller.certificate_id)
        return self.tokens.issue(issued.certificate_id, issued_at=issued.created_at,
                                 claim_certificate_id=caller.certificate_id)

    # -- CreateCertificateFromCsr (§1.3) -----------------------------------------------------
    async def create_certificate_from_csr(self, caller: Caller,
                                          request: CreateCertificateFromCsrRequest
                                          ) -> CreateCertificateFromCsrResponse:
        """Sign a valid CSR (RSA ≥ 2048 or EC P-256/384/521, good self-signature)."""
        self._check_claim_window(caller)
        issued = await self._store(self._sign_csr(request.certificate_signing_request))
        token = self._token_for(issued, caller, Api.CREATE_CERTIFICATE_FROM_CSR)
        return CreateCertificateFromCsrResponse(
            certificate_id=issued.certificate_id,
            certificate_pem=issued.certificate_pem,
            certificate_ownership_token=token,
        )

    def _sign_csr(self, csr_pem: str) -> x509.Certificate:
        try:
            csr = parse_csr(csr_pem)
        except InvalidRequestException as error:
            raise protocol.invalid_csr(error.message.rstrip(".")) from None
        subject = csr.subject if self.settings.csr_subject_from_csr and len(csr.subject) else None
        return self.ca.issue_device_certificate(csr.public_key(), subject)

    # -- RegisterThing (§1.4) ----------------------------------------------------------------
    async def register_thing(self, caller: Caller, template_name: str,
                             request: RegisterThingRequest) -> RegisterThingResponse:
        """Spec §1.4 in order: template, enabled, token, hook, evaluation, one transaction."""
        self._check_claim_window(caller)
        template = self._template(template_name)
        contents = self._read_token(request.certificate_ownership_token)
        cert = self.registry.get_certificate(contents.certificate_id)
        if cert is None:
            raise protocol.token_invalid("its certificate no longer exists")
        self._check_pending(cert.status)
        parameters: dict[str, str] = dict(request.parameters)
        hook = template.pre_provisioning_hook
        if hook is not None:
            overrides = await self._run_hook(hook.target_arn, template.template_arn, caller,
                                             cert.certificate_id, cert.certificate_pem,
                                             parameters, template_name)
            parameters = merge_hook_overrides(parameters, overrides)
        automatic = certificate_parameters(pki.load_certificate(cert.certificate_pem),
                                           cert.certificate_id)
        plan = evaluate(template.template_body, parameters, automatic)
        await self.writer.run(functools.partial(self._apply, plan, cert.certificate_id,
                                                cert.certificate_arn))
        thing_name = plan.thing.thing_name if plan.thing is not None else None
        self.observations.record(Kind.THING_REGISTERED, client_id=caller.client_id,
                                 certificate_id=cert.certificate_id, thingName=thing_name,
                                 template=template_name)
        log.info("event=thing_registered thing=%s cert=%s template=%s", thing_name,
                 cert.certificate_id, template_name)
        return RegisterThingResponse(thing_name=thing_name,
                                     device_configuration=plan.device_configuration)

    def _template(self, name: str) -> TemplateDescription:
        try:
            template = self.registry.describe_provisioning_template(template_name=name)
        except (ResourceNotFoundException, InvalidRequestException):
            raise protocol.template_not_found(name) from None
        if TemplateType(template.type) is not TemplateType.FLEET_PROVISIONING:
            raise protocol.template_wrong_type(name)
        if not template.enabled:
            raise protocol.template_disabled(name)
        return template

    def _read_token(self, token: str) -> TokenContents:
        try:
            return self.tokens.read(token, now=self.clock.now())
        except TokenError as error:
            raise protocol.token_invalid(error.problem.value) from None

    @staticmethod
    def _check_pending(status: CertificateStatus) -> None:
        if status is CertificateStatus.PENDING_ACTIVATION:
            return
        if status in (CertificateStatus.ACTIVE, CertificateStatus.INACTIVE):
            raise protocol.token_invalid("it was already used")
        raise protocol.token_invalid(f"its certificate is {status.value}")

    async def _run_hook(self, target_arn: str, template_arn: str, caller: Caller,
                        certificate_id: str, certificate_pem: str,
                        parameters: dict[str, str], template_name: str) -> dict[str, str]:
        """§4: invoke the hook; anything but an allow rejects with 403."""
        outcome = await self.hooks.invoke(target_arn, HookInput(
            claim_certificate_id=caller.certificate_id,
            certificate_id=certificate_id,
            certificate_pem=certificate_pem,
            template_arn=template_arn,
            client_id=caller.client_id,
            parameters=parameters,
        ))
        self.observations.record(Kind.HOOK, client_id=caller.client_id,
                                 certificate_id=certificate_id, template=template_name,
                                 targetArn=target_arn, allowed=outcome.allowed,
                                 reason=outcome.reason)
        if outcome.allowed:
            return dict(outcome.parameter_overrides)
        if outcome.reason == REASON_NO_TARGET:
            log.warning("event=hook_unmapped arn=%s template=%s", target_arn, template_name)
            raise protocol.hook_unmapped(target_arn)
        raise protocol.hook_denied()

    def _apply(self, plan: ProvisioningPlan, certificate_id: str, certificate_arn: str,
               registry: Registry) -> None:
        """Write an evaluated plan (a writer job: one transaction, or a savepoint of one)."""
        current = registry.get_certificate(certificate_id)
        if current is None:
            raise protocol.token_invalid("its certificate no longer exists")
        self._check_pending(current.status)  # a concurrent RegisterThing got there first
        PlanApplier(registry, certificate_id, certificate_arn).apply(plan)

    # -- CreateProvisioningClaim (§2.1) ------------------------------------------------------
    def create_provisioning_claim(self, template_name: str) -> ProvisioningClaim:
        """A temporary claim for ``template_name``: blocking and thread-safe (the control
        plane calls it from an executor thread). Missing template → ResourceNotFound; a JITP
        template → InvalidRequest; a disabled one still gets a claim (§2.2 inference)."""
        try:
            template = self.registry.describe_provisioning_template(template_name=template_name)
        except ResourceNotFoundException:
            raise ResourceNotFoundException(
                f"The provisioning template {template_name} does not exist") from None
        if TemplateType(template.type) is not TemplateType.FLEET_PROVISIONING:
            raise InvalidRequestException(
                f"The provisioning template {template_name} is not a FLEET_PROVISIONING "
                "template")
        claim = self.claims.issue(template_name)
        self.observations.record(Kind.CERTIFICATE_CREATED, certificate_id=claim.certificate_id,
                                 api="CreateProvisioningClaim", template=template_name,
                                 temporary=True, expiration=claim.expiration)
        return claim

    # -- expiry (§1.6, §2.2) -----------------------------------------------------------------
    def sweep_blocking(self, now: float | None = None) -> int:
        """Delete provisioning certificates whose token expired unused (still
        PENDING_ACTIVATION, attached to nothing) and forget dead claims. Returns how many
        certificates were deleted. Blocking: threads only."""
        now = self.clock.now() if now is None else now
        deleted = 0
        with self._sweep_lock:
            cutoff = now - self.settings.token_lifetime
            for cert in self.registry.provisioning_certificates():
                if cert.creation_date > cutoff:
                    continue
                if self._delete_if_unused(cert.certificate_id):
                    deleted += 1
            self.claims.prune(now)
        return deleted

    def _delete_if_unused(self, certificate_id: str) -> bool:
        with self.registry.transaction() as registry:
            cert = registry.get_certificate(certificate_id)
            if cert is None or cert.status is not CertificateStatus.PENDING_ACTIVATION:
                return False
            arn = cert.certificate_arn
            if (registry.list_principal_things(principal=arn).things
                    or registry.list_attached_policies(target=arn).policies):
                return False
            registry.delete_certificate_record(certificate_id)
        self.observations.record(Kind.CERTIFICATE_DELETED, certificate_id=certificate_id,
                                 reason="ownership token expired unused")
        log.info("event=certificate_expired cert=%s", certificate_id)
        return True

    async def sweep(self) -> int:
        return await self._off_loop(self.sweep_blocking)

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("event=sweep_failed")

    def _clock_advanced(self, now: float) -> None:
        """Expiries take effect when the clock moves: at once on the advancing thread, or as
        a task when the loop itself advanced it."""
        if self._stopped:
            return
        if threading.get_ident() == self._loop_thread:
            assert self._loop is not None
            self._loop.create_task(self.sweep())
            return
        try:
            self.sweep_blocking(now)
        except Exception:
            log.exception("event=sweep_failed")

    def _registry_event(self, event: Any) -> None:
        if getattr(event, "kind", None) == "reset":
            self.claims.clear()
