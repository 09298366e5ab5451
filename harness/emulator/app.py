"""The emulated endpoint as one object: registry, broker, control plane and admin API.

:class:`Emulator` runs on an asyncio loop (the ``fleetbench emulator`` command);
:class:`EmbeddedEmulator` runs one in a background thread for tests and for
synchronous code. Both take the same :class:`EmulatorConfig`, the Python form of
the command's options.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import pki
from harness.clock import Clock
from harness.emulator.quotas import QuotaSet
from harness.endpoint_info import EndpointInfo
from harness.observations import ObservationLog

if TYPE_CHECKING:
    from harness.emulator.faults import FaultPlan

log = logging.getLogger("fleetbench.emulator")

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT_ID = "123456789012"


@dataclass(frozen=True)
class EmulatorConfig:
    """Options of ``fleetbench emulator`` (see ``--help``)."""

    host: str = "127.0.0.1"
    mqtt_port: int = 8883
    api_port: int = 8443
    api_host: str = "127.0.0.1"
    data_dir: Path | None = None
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT_ID
    sans: tuple[str, ...] = ()
    hooks: Mapping[str, str] = field(default_factory=dict)
    api_token: str | None = None
    broker_overrides: Mapping[str, Any] = field(default_factory=dict)
    key_pool_size: int = 32
    key_pool_workers: int = 1
    #: SQLite ``synchronous`` for the registry: "NORMAL" (default) keeps every acknowledged
    #: write across a killed emulator; "FULL" also across a power cut, at one fsync a commit.
    durability: str = "NORMAL"
    #: Seconds a pre-provisioning hook may take (AWS's Lambda limit is 5 s, spec fleet §4).
    hook_timeout: float = 5.0
    #: Request-rate quotas (``--quotas aws`` = ``QuotaSet.aws()``); empty: none applies.
    quotas: QuotaSet = field(default_factory=QuotaSet)
    #: Fault plan in force from the start (``--faults plan.yaml``); the admin API may replace it.
    faults: FaultPlan | None = None


def _server_names(config: EmulatorConfig) -> list[str]:
    names = ["localhost", "127.0.0.1", *config.sans]
    if config.host not in ("0.0.0.0", "::", ""):
        names.append(config.host)
    return list(dict.fromkeys(names))


def load_server_identity(data_dir: Path, ca: pki.CertificateAuthority,
                         names: list[str]) -> tuple[pki.PrivateKey, Any]:
    """Reuse the server key/certificate in ``data_dir`` if it covers ``names``, else issue one."""
    key_path, cert_path = data_dir / "server.key", data_dir / "server.pem"
    if key_path.exists() and cert_path.exists():
        cert = pki.load_certificate(cert_path.read_bytes())
        try:
            from cryptography import x509

            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
            have |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
        except Exception:  # any unreadable cert is simply replaced
            have = set()
        if set(names) <= have:
            return pki.load_private_key(key_path.read_bytes()), cert
    key = pki.generate_ec_key()
    cert = ca.issue_server_certificate(key, names)
    pki.write_secret(key_path, pki.private_key_pem(key, pkcs1=False))
    pki.write_public(cert_path, pki.certificate_pem(cert))
    return key, cert


class Emulator:
    """An emulated AWS IoT Core endpoint on the running event loop."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._tmp: str | None = None
        if self.config.data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="fleetbench-emulator-")
            self.data_dir = Path(self._tmp)
        else:
            self.data_dir = Path(self.config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.clock = Clock()
        self.observations = ObservationLog(self.clock)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fleetbench-io")
        self.ca = pki.CertificateAuthority.load_or_create(self.data_dir)
        self.ca_file = self.data_dir / "ca.pem"
        self.info: EndpointInfo | None = None
        self._runner: Any = None
        self._started = False
        self.registry: Any = None
        self.broker: Any = None
        self.provisioning: Any = None
        self.hook_targets: Any = None
        self.quotas: Any = None
        self.faults: Any = None

    # -- composition -------------------------------------------------------------------------
    def _build(self) -> None:
        from harness.emulator import hooks as hooks_mod
        from harness.emulator.broker_settings import BrokerSettings
        from harness.emulator.faults import FaultingHookRunner, FaultInjector
        from harness.emulator.mqtt.server import Broker
        from harness.emulator.policy import parse_policy
        from harness.emulator.provisioning import ProvisioningService
        from harness.emulator.quotas import QuotaEnforcer
        from harness.emulator.registry import Registry
        from harness.emulator.registry.settings import RegistrySettings
        from harness.emulator.templates import validate_template_body

        self.registry = Registry(
            self.data_dir / "registry.sqlite3",
            region=self.config.region,
            account_id=self.config.account_id,
            clock=self.clock,
            ca=self.ca,
            template_validator=validate_template_body,
            policy_parser=parse_policy,
            settings=RegistrySettings(synchronous=self.config.durability.upper()),
        )
        key, cert = load_server_identity(self.data_dir, self.ca, _server_names(self.config))
        settings = BrokerSettings(**dict(self.config.broker_overrides))
        self.broker = Broker(
            directory=self.registry,
            ca=self.ca,
            server_key=key,
            server_cert=cert,
            clock=self.clock,
            observations=self.observations,
            settings=settings,
            region=self.config.region,
            account_id=self.config.account_id,
        )
        self.quotas = QuotaEnforcer(self.config.quotas, clock=self.clock,
                                    observations=self.observations)
        self.quotas.bind_broker(self.broker)  # Connect quotas are the broker's limiters
        self.faults = FaultInjector(self.config.faults, observations=self.observations)
        self.faults.bind(disconnect=self.broker.disconnect, restart=self.broker.restart)
        self.broker.handshake_gate = self.faults.handshake_stall
        self.hook_targets = hooks_mod.HookTargets()
        for arn, target in self.config.hooks.items():
            self.hook_targets.set(arn, target)
        self.provisioning = ProvisioningService(
            registry=self.registry,
            broker=self.broker,
            ca=self.ca,
            clock=self.clock,
            observations=self.observations,
            hooks=FaultingHookRunner(self.hook_targets, faults=self.faults,
                                     timeout=self.config.hook_timeout),
            executor=self.executor,
            region=self.config.region,
            account_id=self.config.account_id,
            key_pool_size=self.config.key_pool_size,
            key_pool_workers=self.config.key_pool_workers,
            data_dir=self.data_dir,
            quotas=self.quotas,
            faults=self.faults,
        )

    def backend(self) -> Any:
        """The object the control plane dispatches operations to."""
        from harness.emulator.iot_backend import IotBackend

        return IotBackend(self)

    async def start(self) -> EndpointInfo:
        """Start listening; write ``endpoint.json``; return where the endpoint is."""
        from aiohttp import web

        from harness.emulator.admin import AdminState
        from harness.emulator.admin_faults import fault_routes
        from harness.emulator.controlplane import build_app

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._build)
        await self.provisioning.start()
        mqtt_port = await self.broker.start(self.config.host, self.config.mqtt_port)
        admin = AdminState(
            observations=self.observations,
            clock=self.clock,
            get_hooks=self.hook_targets.as_dict,
            set_hooks=self.hook_targets.replace,
            reset=self.reset,
            extensions=(fault_routes(self.faults, self.quotas),),
        )
        app = build_app(
            self.backend(),
            region=self.config.region,
            account_id=self.config.account_id,
            admin=admin,
            api_token=self.config.api_token,
            executor=self.executor,
            gate=self._control_plane_gate,
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        await site.start()
        api_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        mqtt_host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        api_host = self.config.api_host if self.config.api_host not in ("0.0.0.0", "::") \
            else "127.0.0.1"
        self.info = EndpointInfo(
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            api_url=f"http://{api_host}:{api_port}",
            ca_file=str(self.ca_file),
            region=self.config.region,
            account_id=self.config.account_id,
            data_dir=str(self.data_dir),
            mqtt_server_name="localhost",
            pid=os.getpid(),
        )
        await loop.run_in_executor(self.executor, self.info.write, self.data_dir / "endpoint.json")
        self._started = True
        log.info("event=listening mqtt=%s:%d api=%s", mqtt_host, mqtt_port, self.info.api_url)
        return self.info

    async def _control_plane_gate(self, operation: str, params: Mapping[str, Any]) -> None:
        """Issue 10: faults first (a rejected call uses no quota), then the quota."""
        await self.faults.on_control_plane(operation, params)
        self.quotas.check_control_plane(operation)

    def reset(self) -> None:
        """Empty the account (admin API): registry, sessions, retained messages, observations."""
        self.registry.reset()
        self.observations.clear()

    async def stop(self) -> None:
        if self.faults is not None:
            await self.faults.close()  # no broker restart after this
        if self.broker is not None:
            await self.broker.stop()
        if self.provisioning is not None:
            await self.provisioning.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.registry is not None:
            self.registry.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


class EmbeddedEmulator:
    """An :class:`Emulator` on its own event loop in a background thread.

    For tests and synchronous code: ``with EmbeddedEmulator(config) as emu: emu.info``.
    Coroutines can be run on the emulator's loop with :meth:`call`.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        # Embedded emulators are for tests and scripts: free ports unless told otherwise.
        self.emulator = Emulator(config or EmulatorConfig(mqtt_port=0, api_port=0))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def info(self) -> EndpointInfo:
        assert self.emulator.info is not None, "emulator not started"
        return self.emulator.info

    def start(self, timeout: float = 60.0) -> EndpointInfo:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                import uvloop

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.emulator.start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                try:  # release what did start: key workers, threads, a temp dir
                    loop.run_until_complete(self.emulator.stop())
                except Exception:
                    log.exception("event=stop_after_failed_start_failed")
                finally:
                    loop.close()
                    self._loop = None  # stop() after a failed start has nothing to do
                    self._stopped.set()
                    ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.emulator.stop())
                loop.close()
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="fleetbench-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("emulator did not start in time")
        if failure:
            raise failure[0]
        return self.info

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the emulator's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = None

    def __enter__(self) -> EmbeddedEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
