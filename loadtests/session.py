"""A load run inside Locust: setup on test start, flows collected, truth and teardown on stop.

One :class:`LoadSession` per Locust process, made by the locustfile's ``init`` listener.
What it does depends on the process's role:

* the master, or the only process (``LocalRunner``), prepares the fleet on test start
  (:class:`~loadtests.fleet_setup.LoadFleet`, once per test) and puts the
  :class:`~loadtests.fleet_setup.FleetHandoff` and the pacing into the options Locust
  sends with every spawn message; on test stop it collects every flow, asks the endpoint
  (:func:`~loadtests.truth.check_run`), tears the fleet down, and writes the run's
  ``results.json``/``report.html`` (:mod:`loadtests.report`);
* a worker unpacks the handoff on test start, runs devices, and ships its flow records
  to the master inside Locust's own stats reports (``report_to_master``), with a final
  batch (and its CPU time) once its users have stopped.

Locust's headless master fires ``test_stop`` *before* telling workers to quit, so the
master asks workers that have not sent their final batch to stop and drain
(``fleetbench_drain``), and waits for them before judging the run.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import time
from pathlib import Path
from typing import Any, ClassVar

import gevent
import psutil
from gevent.event import Event
from locust.runners import (
    STATE_STOPPED,
    STATE_STOPPING,
    LocalRunner,
    MasterRunner,
    WorkerRunner,
)
from locust.stats import CSV_STATS_INTERVAL_SEC

from devices.base import CertApi, Flow, MqttVersion
from devices.mqtt_transport import LoopDriver
from devices.virtual import Jitter, KeyType, RetryPolicy
from harness.gc_tuning import tune_gc, untune_gc
from harness.protocol import PayloadFormat
from harness.reporting.records import new_run_id
from loadtests import report as reporting
from loadtests.events import FlowJournal, FlowOutcome, RequestEvents, Tee
from loadtests.fleet_setup import (
    FleetHandoff,
    LoadFleet,
    describe,
    open_endpoint,
    open_target,
    process_workdir,
    remove_workdir,
)
from loadtests.flows import SUBSCRIBE_MODES, FlowSettings, FlowTarget
from loadtests.shapes import DEFAULT_PACING_S, Schedule, ShapeError, build_schedule
from loadtests.truth import TruthReport, check_run

log = logging.getLogger("fleetbench.load")

__all__ = ["LoadSession", "add_arguments"]

MSG_FINAL = "fleetbench_final"
MSG_DRAIN = "fleetbench_drain"
REPORT_KEY = "fleetbench"
HANDOFF_OPTION = "fleetbench_handoff"
#: Seconds users get to finish their flow when a test stops, unless --stop-timeout says.
DEFAULT_STOP_TIMEOUT_S = 30.0
#: Seconds the master waits for workers' final batches beyond the stop timeout.
FINAL_GRACE_S = 30.0
#: Seconds a user waits for the fleet handoff before giving up.
HANDOFF_WAIT_S = 120.0


def add_arguments(parser: Any) -> None:
    """The ``--fleet-*`` options (Locust's ``init_command_line_parser``)."""

    def add(*names: str, ui: bool = False, **kwargs: Any) -> None:
        # Locust's parser shows every custom option in the web UI unless told otherwise
        parser.add_argument(*names, include_in_web_ui=ui, **kwargs)

    add("--fleet-endpoint", choices=("local", "file", "aws"), default="local",
        help="local: start an emulator for this session; file: --fleet-endpoint-file; aws")
    add("--fleet-endpoint-file", default="", help="an emulator's endpoint.json")
    add("--fleet-api-token", default="", help="the emulator's --api-token")
    add("--fleet-aws-profile", default="", help="boto3 profile (aws)")
    add("--fleet-aws-region", default="", help="AWS region (aws)")
    add("--fleet-role-arn", default="",
        help="provisioning role of the template (aws: default creates one with IAM)")
    add("--fleet-emulator-arg", action="append", default=[],
        help="extra `fleetbench emulator` argument(s) for --fleet-endpoint local "
             "(e.g. '--quotas aws'); repeatable")
    add("--fleet-shape", default="users", ui=True,
        choices=("users", "steady", "ramp", "spike", "soak", "factory"),
        help="load shape; users = Locust's own -u/-r/-t")
    add("--fleet-rate", type=float, default=10.0, ui=True, help="flows per second")
    add("--fleet-duration", default="", ui=True, help="run length (60s, 2m, 1h)")
    add("--fleet-pacing", default=str(DEFAULT_PACING_S), ui=True,
        help="seconds between two flows of one user (rate = users / pacing)")
    add("--fleet-ramp-from", type=float, default=0.0, help="ramp: starting flows/s")
    add("--fleet-ramp-to", type=float, default=None, help="ramp: final flows/s")
    add("--fleet-ramp-time", default="", help="ramp/soak: ramp length")
    add("--fleet-devices", type=int, default=None, ui=True,
        help="spike/factory: devices switched on together")
    add("--fleet-at", default="10s", help="spike: when the batch comes online")
    add("--fleet-every", default="10s", help="factory: seconds between batches")
    add("--fleet-base-rate", type=float, default=0.0, help="spike: background flows/s")
    add("--fleet-format", choices=("json", "cbor"), default="json", ui=True)
    add("--fleet-mqtt", choices=("3", "5"), default="3", help="MQTT version of the devices")
    add("--fleet-trusted-cert", choices=("csr", "keys"), default="csr",
        help="certificate API of TrustedUserUser devices")
    add("--fleet-key-type", choices=("ec-p256", "rsa-2048"), default="ec-p256",
        help="key a CSR device generates (rsa-2048 costs ~37 ms of load-generator CPU)")
    add("--fleet-subscribe", choices=SUBSCRIBE_MODES, default=SUBSCRIBE_MODES[0],
        help="once: one SUBSCRIBE for both calls' replies; per-call: before each call")
    add("--fleet-hold", default="0", help="seconds a device stays connected once provisioned")
    add("--fleet-timeout", type=float, default=10.0, help="connect/response timeout (s)")
    add("--fleet-max-attempts", type=int, default=5, help="tries per throttled request")
    add("--fleet-base-delay", type=float, default=0.1, help="first backoff ceiling (s)")
    add("--fleet-max-delay", type=float, default=5.0, help="largest backoff (s)")
    add("--fleet-claim-key", choices=("ec", "rsa"), default="ec", help="claim key type")
    add("--fleet-run-id", default="", help="report directory name (default: new run id)")
    add("--fleet-reports-dir", default="reports", help="where reports/<run-id>/ goes")
    add("--fleet-truth-sample", type=int, default=0,
        help="check this many random successes at the endpoint (0: all)")
    add("--fleet-no-truth", action="store_true", default=False, help="skip the truth check")
    add("--fleet-keep", action="store_true", default=False,
        help="leave the fleet in place (no teardown)")


def _cpu_seconds(pid: int | None = None) -> float:
    times = psutil.Process(pid).cpu_times() if pid else psutil.Process().cpu_times()
    return float(times.user + times.system)


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seconds(value: Any, default: float = 0.0) -> float:
    from loadtests.shapes import parse_duration

    parsed = parse_duration(value)
    return default if parsed is None else parsed


class LoadSession:
    """The fleetbench side of one Locust process (see the module docstring)."""

    _by_env: ClassVar[dict[int, LoadSession]] = {}

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.runner = environment.runner
        self.journal = FlowJournal(ship=isinstance(self.runner, WorkerRunner))
        self.events = RequestEvents(environment.events.request.fire)
        self.sink = Tee([self.events, self.journal])
        self.endpoint: Any = None
        self.fleet: LoadFleet | None = None
        self.handoff: FleetHandoff | None = None
        self.schedule: Schedule | None = None
        self.target: FlowTarget | None = None
        self.workdir: Path | None = None
        self.driver: LoopDriver | None = None
        self._driver_greenlet: Any = None
        self._gc_thresholds: tuple[int, int, int] | None = None
        self.ready = Event()
        self.failed_setup: str | None = None
        self.finals: dict[str, dict[str, Any]] = {}
        self.participants: set[str] = set()
        self.final_sent = False
        self._final_pending = False
        self.started_at = 0.0
        self.cpu_start = 0.0
        self.emulator_cpu_start: float | None = None
        self.run_ids: list[str] = []
        self.slots = 0
        self.online = 0  # devices connected with their own certificate, right now
        self.peak_online = 0
        self.last_record_dir: Path | None = None
        self.last_truth: TruthReport | None = None
        events = environment.events
        events.test_start.add_listener(self._on_test_start)
        events.test_stop.add_listener(self._on_test_stop)
        events.quitting.add_listener(self._on_quitting)
        if isinstance(self.runner, WorkerRunner):
            events.report_to_master.add_listener(self._on_report_to_master)
            self.runner.register_message(MSG_DRAIN, self._on_drain, concurrent=True)
        if isinstance(self.runner, MasterRunner):
            events.worker_report.add_listener(self._on_worker_report)
            self.runner.register_message(MSG_FINAL, self._on_final)
        options = environment.parsed_options
        if options is not None and not getattr(options, "stop_timeout", 0):
            environment.stop_timeout = DEFAULT_STOP_TIMEOUT_S
        # one line per removed resource is noise when a run made thousands of them
        logging.getLogger("fleetbench.teardown").setLevel(logging.WARNING)
        LoadSession._by_env[id(environment)] = self

    @classmethod
    def of(cls, environment: Any) -> LoadSession:
        return cls._by_env[id(environment)]

    # -- roles ---------------------------------------------------------------------------------
    @property
    def options(self) -> Any:
        return self.environment.parsed_options

    @property
    def is_worker(self) -> bool:
        return isinstance(self.runner, WorkerRunner)

    @property
    def is_local(self) -> bool:
        return isinstance(self.runner, LocalRunner)

    @property
    def pacing_s(self) -> float:
        value = getattr(self.options, "fleetbench_pacing", None)
        return float(value) if value else _seconds(getattr(self.options, "fleet_pacing", None),
                                                   DEFAULT_PACING_S)

    @property
    def spread_s(self) -> float:
        """Up to how long a new user waits before its first flow (see shapes)."""
        value = getattr(self.options, "fleetbench_spread", None)
        return float(value) if value is not None else 0.0

    def flow_settings(self, flow: Flow, cert_api: CertApi | None) -> FlowSettings:
        o = self.options
        if cert_api is None:
            cert_api = CertApi(getattr(o, "fleet_trusted_cert", "csr"))
        timeout = float(getattr(o, "fleet_timeout", 10.0))
        return FlowSettings(
            cert_api=cert_api, flow=flow,
            payload_format=PayloadFormat(getattr(o, "fleet_format", "json")),
            mqtt_version=MqttVersion(int(getattr(o, "fleet_mqtt", 3))),
            key_type=KeyType(getattr(o, "fleet_key_type", KeyType.EC_P256.value)),
            connect_timeout_s=timeout, response_timeout_s=timeout,
            hold_s=_seconds(getattr(o, "fleet_hold", 0)),
            subscribe=getattr(o, "fleet_subscribe", "once"),
            retry=RetryPolicy(max_attempts=int(getattr(o, "fleet_max_attempts", 5)),
                              base_delay_s=float(getattr(o, "fleet_base_delay", 0.1)),
                              max_delay_s=float(getattr(o, "fleet_max_delay", 5.0)),
                              jitter=Jitter.FULL))

    # -- device side (workers and the local runner) --------------------------------------------
    def wait_target(self, timeout: float = HANDOFF_WAIT_S) -> FlowTarget | None:
        self.ready.wait(timeout)
        return self.target

    def new_slot_dir(self) -> Path:
        assert self.workdir is not None
        self.slots += 1
        return self.workdir / "slots" / f"{self.slots:06d}"

    def device_online(self, delta: int) -> None:
        """The connected-device gauge (``DeviceSlot``'s ``online``)."""
        self.online += delta
        self.peak_online = max(self.peak_online, self.online)

    def record(self, outcome: FlowOutcome) -> None:
        self.journal.add(outcome)
        if not outcome.interrupted:
            self.events.flow(outcome)

    def _install_device_side(self, handoff: FleetHandoff) -> None:
        self._remove_device_side()
        self.workdir = process_workdir()
        profile = getattr(self.options, "fleet_aws_profile", "") or None
        self.target = open_target(handoff, self.workdir / "fleet", trusted_user=True,
                                  profile=profile)
        self.driver = LoopDriver(cooperative=True)  # every user is a greenlet of this thread
        self._driver_greenlet = gevent.spawn(self.driver.run_forever)
        self._gc_thresholds = tune_gc()
        self.ready.set()

    def _remove_device_side(self) -> None:
        self.ready.clear()
        if self.driver is not None:
            self.driver.stop()
            self.driver = None
        if self._driver_greenlet is not None:
            self._driver_greenlet.join(timeout=2)
            self._driver_greenlet = None
        if self._gc_thresholds is not None:
            untune_gc(self._gc_thresholds)
            self._gc_thresholds = None
        remove_workdir(self.workdir)
        self.workdir = None
        self.target = None

    # -- test start ----------------------------------------------------------------------------
    def _on_test_start(self, environment: Any, **_kw: Any) -> None:
        self.journal.clear()
        self.finals.clear()
        self.final_sent = False
        self._final_pending = False
        self.failed_setup = None
        self.online = self.peak_online = 0
        if self.is_worker:
            self._worker_start()
            return
        try:
            self._master_start()
        except Exception as exc:  # report and stop the test, never crash Locust
            self.failed_setup = f"{type(exc).__name__}: {exc}"
            log.error("event=fleet_setup_failed error=%s", self.failed_setup)
            environment.process_exit_code = 2
            self.ready.set()  # users see no target and stop
            gevent.spawn_later(0, self.runner.quit)
            return
        if self.is_local and self.handoff is not None:
            self._install_device_side(self.handoff)
        shape = getattr(environment, "shape_class", None)
        if shape is not None:  # the shape's duration counts from here, setup excluded
            shape.reset_time()
        self.cpu_start = _cpu_seconds()
        self.emulator_cpu_start = self._emulator_cpu()
        self.started_at = time.time()

    def _worker_start(self) -> None:
        text = getattr(self.options, HANDOFF_OPTION, None)
        if not text:
            log.error("event=no_fleet_handoff (the master sent no fleet; is it a fleetbench "
                      "locustfile on the master?)")
            self.ready.set()
            return
        try:
            self.handoff = FleetHandoff.from_json(text)
            self._install_device_side(self.handoff)
        except Exception as exc:  # a bad handoff or unwritable disk: users see no target
            log.error("event=fleet_handoff_unusable error=%s: %s", type(exc).__name__, exc)
            self.ready.set()
            return
        self.cpu_start = _cpu_seconds()
        self.started_at = time.time()

    def _master_start(self) -> None:
        options = self.options
        try:
            self.schedule = build_schedule(options)
        except ShapeError as exc:
            raise ValueError(f"bad load shape: {exc}") from None
        if self.endpoint is None:
            self.endpoint = open_endpoint(options)
        wanted = getattr(options, "fleet_run_id", "") or ""
        run_id = wanted if wanted and wanted not in self.run_ids else new_run_id()
        self.run_ids.append(run_id)
        prefix = f"fbl{secrets.token_hex(3)}"
        self.fleet = LoadFleet(self.endpoint, run_id, prefix,
                               claim_key=getattr(options, "fleet_claim_key", "ec"),
                               role_arn=getattr(options, "fleet_role_arn", "") or None,
                               api_token=getattr(options, "fleet_api_token", "") or None,
                               pacing_s=self.schedule.pacing_s)
        self.handoff = self.fleet.setup()
        setattr(options, HANDOFF_OPTION, self.handoff.to_json())
        options.fleetbench_pacing = self.schedule.pacing_s  # users' pacing, on every worker
        options.fleetbench_spread = self.schedule.spread_s
        if isinstance(self.runner, MasterRunner):
            self.participants = {c.id for c in self.runner.clients.all}
        log.info("event=load_run_started run_id=%s prefix=%s shape=%s", run_id, prefix,
                 self.schedule.describe())

    def _emulator_pid(self) -> int | None:
        info = getattr(self.endpoint, "info", None)
        pid = int(getattr(info, "pid", 0) or 0)
        process = getattr(self.endpoint, "process", None)
        if process is not None:
            pid = int(process.pid)
        if pid <= 0 or pid == os.getpid() or not psutil.pid_exists(pid):
            return None
        return pid

    def _emulator_cpu(self) -> float | None:
        """The emulator's CPU seconds, its key-pool worker processes included (RSA keys
        for CreateKeysAndCertificate are made there)."""
        pid = self._emulator_pid()
        if pid is None:
            return None
        try:
            total = _cpu_seconds(pid)
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    total += _cpu_seconds(child.pid)
                except psutil.Error:
                    continue  # exited between listing and reading
        except psutil.Error:
            return None
        return total

    # -- worker -> master ------------------------------------------------------------------------
    def _on_report_to_master(self, client_id: str, data: dict[str, Any]) -> None:
        batch = self.journal.drain()
        if self._final_pending:
            batch.update(final=True, cpu_s=_cpu_seconds() - self.cpu_start,
                         rss_mib=_peak_rss_mib(), peak_online=self.peak_online)
            self._final_pending = False
        if batch:
            data[REPORT_KEY] = batch

    def _on_worker_report(self, client_id: str, data: dict[str, Any]) -> None:
        batch = data.get(REPORT_KEY)
        if not batch:
            return
        self.journal.merge(batch)
        self.participants.add(client_id)
        if batch.get("final"):
            self.finals[client_id] = dict(batch)

    def _send_final(self) -> None:
        """The worker's last flows and CPU time, in a stats report of its own, so that
        Locust's statistics on the master are complete when the run is judged."""
        if self.final_sent:
            return
        self.final_sent = True
        self._final_pending = True
        send_stats = getattr(self.runner, "_send_stats", None)
        if callable(send_stats):
            send_stats()  # Locust's own final report (it fires report_to_master)
        if self._final_pending:  # no such method in this Locust: a message of our own
            self._final_pending = False
            batch = self.journal.drain() or {}
            batch.update(final=True, cpu_s=_cpu_seconds() - self.cpu_start,
                         rss_mib=_peak_rss_mib(), peak_online=self.peak_online)
            self.runner.send_message(MSG_FINAL, batch)
        self._remove_device_side()

    def _on_drain(self, environment: Any, msg: Any, **_kw: Any) -> None:
        if self.runner.state != STATE_STOPPED:
            self.runner.stop()  # users finish their flows; test_stop sends the final batch
        self._send_final()

    def _on_final(self, environment: Any, msg: Any, **_kw: Any) -> None:
        data = dict(msg.data or {})
        self.journal.merge(data)
        self.finals[msg.node_id] = data
        self.participants.add(msg.node_id)

    # -- test stop -------------------------------------------------------------------------------
    def _on_test_stop(self, environment: Any, **_kw: Any) -> None:
        if self.is_worker:
            self._send_final()
            return
        if self.fleet is None or self.handoff is None:
            return
        if isinstance(self.runner, MasterRunner):
            self._collect_finals()
        try:
            self._finish()
        except Exception:  # a reporting bug must not hang Locust
            log.exception("event=load_finish_failed run_id=%s", self.fleet.run_id)
            environment.process_exit_code = 2
        finally:
            if self.is_local:
                self._remove_device_side()
            self.fleet = None

    def _collect_finals(self) -> None:
        def waiting() -> set[str]:
            missing = {c.id for c in self.runner.clients.missing}
            return self.participants - set(self.finals) - missing

        for worker in sorted(waiting()):
            self.runner.send_message(MSG_DRAIN, None, client_id=worker)
        deadline = time.monotonic() + self.environment.stop_timeout + FINAL_GRACE_S
        while waiting() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        lost = self.participants - set(self.finals)
        if lost:
            log.warning("event=workers_without_final workers=%s (flows they ran since their "
                        "last stats report are not in the truth check)", ",".join(sorted(lost)))

    def _finish(self) -> None:
        assert self.fleet is not None and self.handoff is not None
        finished = time.time()
        load_cpu = _cpu_seconds() - self.cpu_start
        load_cpu += sum(float(f.get("cpu_s") or 0.0) for f in self.finals.values())
        emulator_cpu = self._emulator_cpu()
        emulator_used = (emulator_cpu - self.emulator_cpu_start
                         if emulator_cpu is not None and self.emulator_cpu_start is not None
                         else None)
        rss = [_peak_rss_mib()] + [float(f.get("rss_mib") or 0.0) for f in self.finals.values()]
        cpu = reporting.CpuUsage(window_s=finished - self.started_at, load_generator_s=load_cpu,
                                 load_generator_processes=1 + len(self.finals),
                                 emulator_s=emulator_used, peak_rss_mib=tuple(rss))
        samples = _samples(self.environment.stats)
        outcomes = list(self.journal.outcomes)
        options = self.options
        truth: TruthReport | None = None
        if not getattr(options, "fleet_no_truth", False):
            truth = check_run(self.endpoint.iot, self.handoff.prefix, outcomes,
                              sample=int(getattr(options, "fleet_truth_sample", 0) or 0))
            for line in truth.summary_lines():
                log.info("%s", line)
        cleanup = None
        if not getattr(options, "fleet_keep", False):
            t0 = time.monotonic()
            cleanup = {**self.fleet.teardown().to_dict(),
                       "seconds": round(time.monotonic() - t0, 3)}
            log.info("event=fleet_removed prefix=%s seconds=%.1f leftovers=%d",
                     self.handoff.prefix, cleanup["seconds"], len(cleanup["leftovers"]))
        else:
            log.warning("event=fleet_kept prefix=%s (remove with `fleetbench cleanup --prefix "
                        "%s`)", self.handoff.prefix, self.handoff.prefix)
        facts = reporting.RunFacts(
            run_id=self.fleet.run_id, endpoint_kind=self.handoff.endpoint_kind,
            region=self.handoff.region, account=self.handoff.account_id,
            started_at=self.started_at, finished_at=finished,
            shape=self.schedule.describe() if self.schedule is not None else {},
            flow=self._flow_facts(), fleet=describe(self.handoff), cpu=cpu, cleanup=cleanup,
            peak_connected=self.peak_online + sum(int(f.get("peak_online") or 0)
                                                  for f in self.finals.values()))
        record = reporting.build_record(facts, samples, outcomes, self.journal.throttles, truth)
        reports_dir = getattr(options, "fleet_reports_dir", "reports") or "reports"
        self.last_record_dir = reporting.write(record, reports_dir, self.handoff.secrets)
        self.last_truth = truth
        for line in reporting.summary_lines(record):
            log.info("%s", line)
        log.info("event=load_report path=%s", self.last_record_dir)
        if truth is not None and not truth.ok:
            self.environment.process_exit_code = 1
        if getattr(options, "csv_prefix", None):
            # Locust rewrites its CSV files every CSV_STATS_INTERVAL_SEC and not at exit:
            # give it one more turn, so that flows ending just before the stop are in them.
            gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)

    def _flow_facts(self) -> dict[str, Any]:
        o = self.options
        return {
            "user_classes": sorted({c.__name__ for c in self.environment.user_classes}),
            "payload_format": getattr(o, "fleet_format", "json"),
            "mqtt": int(getattr(o, "fleet_mqtt", 3)),
            "trusted_cert": getattr(o, "fleet_trusted_cert", "csr"),
            "key_type": getattr(o, "fleet_key_type", "ec-p256"),
            "claim_key": getattr(o, "fleet_claim_key", "ec"),
            "hold_s": _seconds(getattr(o, "fleet_hold", 0)),
            "subscribe": getattr(o, "fleet_subscribe", "once"),
            "pacing_s": self.pacing_s,
            "retry": {"max_attempts": int(getattr(o, "fleet_max_attempts", 5)),
                      "base_delay_s": float(getattr(o, "fleet_base_delay", 0.1)),
                      "max_delay_s": float(getattr(o, "fleet_max_delay", 5.0))},
            "stop_timeout_s": self.environment.stop_timeout,
        }

    # -- quitting --------------------------------------------------------------------------------
    def _on_quitting(self, environment: Any, **_kw: Any) -> None:
        # Locust fires ``quitting`` before it stops a running test (Ctrl-C, SIGTERM): stop
        # it here, so that it is judged and torn down while the endpoint is still up.
        if self.fleet is not None and not self.is_worker and \
                self.runner.state not in (STATE_STOPPED, STATE_STOPPING):
            self.runner.stop()
        self._remove_device_side()
        if self.endpoint is not None:
            try:
                self.endpoint.close()
            finally:
                self.endpoint = None


def _samples(stats: Any) -> list[reporting.StepSample]:
    out = []
    for (name, method), entry in stats.entries.items():
        if not entry.num_requests:
            continue
        out.append(reporting.StepSample(
            name=str(name), request_type=str(method), count=int(entry.num_requests),
            failures=int(entry.num_failures),
            p50=float(entry.get_response_time_percentile(0.5)),
            p95=float(entry.get_response_time_percentile(0.95)),
            p99=float(entry.get_response_time_percentile(0.99)),
            max=float(entry.max_response_time), rps=float(entry.total_rps),
            response_times=dict(entry.response_times)))
    return out
