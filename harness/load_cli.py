"""``fleetbench load``: a Locust load run of provisioning flows, headless, with its reports.

    fleetbench load --endpoint local|aws --flow claim-csr --rate 50 --duration 60s
        [--shape steady|ramp|spike|soak|factory ...] [--format json|cbor] [--mqtt 3|5]
        [--workers N | --master --expect-workers N] [--quotas aws] [--quota API=N/s]

It starts what the run needs and hands the rest to Locust unchanged
(``loadtests/locustfile.py``): with ``--endpoint local`` an emulator is started for the
run (a subprocess, so that its CPU time is its own) and stopped afterwards; Locust runs
headless as one process, or as a master with ``--workers N`` workers on this machine
(Locust's distributed mode; ``--master`` waits for workers started elsewhere with
``locust -f loadtests/locustfile.py --worker --master-host HOST``). Under
``reports/<run-id>/`` it leaves Locust's ``locust_stats.csv`` (one row per step and one
named ``flow``), ``locust_stats_history.csv``, ``locust_failures.csv`` and
``locust.html``, the harness's ``results.json``/``report.html``/``junit.xml`` (throttles,
the endpoint's verdict, CPU per flow), and Locust's own logs. The summary is printed.

Exit status: 0 every flow succeeded and the endpoint agrees; 1 failed flows or a
disagreement; 2 bad usage, or the run could not be set up.

Options meant for the emulator (``--quotas``, ``--quota``, ``--emulator-arg``) are passed
to ``fleetbench emulator`` as given; they need an emulator that knows them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("fleetbench.load")

__all__ = ["FLOWS", "add_load_parser", "locust_command", "run_load"]


@dataclass(frozen=True)
class FlowChoice:
    """A ``--flow`` value: the Locust user class, and the trusted user's certificate API."""

    user_class: str
    trusted_cert: str = "csr"


#: ``--flow`` values.
FLOWS: dict[str, FlowChoice] = {
    "claim-csr": FlowChoice("ClaimCsrUser"),
    "claim-keys": FlowChoice("ClaimKeysUser"),
    "trusted-user": FlowChoice("TrustedUserUser", "csr"),
    "trusted-user-keys": FlowChoice("TrustedUserUser", "keys"),
}
#: Seconds to wait for Locust to exit after it was asked to stop.
STOP_WAIT_S = 300.0
#: Lines of a Locust log shown when the run produced no results.
LOG_TAIL_LINES = 40


class UsageError(Exception):
    """Bad arguments: exit status 2."""


def add_load_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("load", help="run a Locust load test of provisioning flows",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_argument_group("endpoint")
    where.add_argument("--endpoint", choices=("local", "aws"), default="local",
                       help="local: an emulator started for the run (default); aws: a real "
                            "account through the boto3 credential chain")
    where.add_argument("--endpoint-file", type=Path,
                       help="use an emulator that is already running (its endpoint.json)")
    where.add_argument("--api-token", default=None, help="the emulator's --api-token")
    where.add_argument("--aws-profile", default=None)
    where.add_argument("--aws-region", default=None)
    where.add_argument("--role-arn", default=None,
                       help="provisioning role (aws; default: one is created with IAM)")
    _add_quota_options(p)
    where.add_argument("--emulator-arg", action="append", default=[], metavar="ARG",
                       help="any other `fleetbench emulator` argument (repeatable)")
    flow = p.add_argument_group("devices")
    flow.add_argument("--flow", choices=sorted(FLOWS), default="claim-csr")
    flow.add_argument("--format", choices=("json", "cbor"), default="json")
    flow.add_argument("--mqtt", choices=("3", "5"), default="3")
    flow.add_argument("--hold", default="0",
                      help="seconds each device stays connected once provisioned")
    flow.add_argument("--max-attempts", type=int, default=5,
                      help="tries per throttled request (AWS SDK-style backoff)")
    flow.add_argument("--claim-key", choices=("ec", "rsa"), default="ec")
    flow.add_argument("--subscribe", choices=("once", "per-call"), default="once",
                      help="once: each device subscribes to both calls' replies in one "
                           "SUBSCRIBE; per-call: before each call, as the SDK samples do")
    shape = p.add_argument_group("load shape (rates in flows per second)")
    shape.add_argument("--shape", choices=("steady", "ramp", "spike", "soak", "factory"),
                       default="steady")
    shape.add_argument("--rate", type=float, default=10.0, help="flows/s (steady, soak)")
    shape.add_argument("--duration", default="60s", help="run length: 60, 60s, 2m, 1h")
    shape.add_argument("--pacing", default=None,
                       help="seconds between two flows of one Locust user (default 2)")
    shape.add_argument("--ramp-from", type=float, default=0.0)
    shape.add_argument("--ramp-to", type=float, default=None, help="ramp: final flows/s "
                                                                     "(default --rate)")
    shape.add_argument("--ramp-time", default=None, help="ramp/soak: ramp length")
    shape.add_argument("--devices", type=int, default=None,
                       help="spike: batch size; factory: devices per batch")
    shape.add_argument("--at", default=None, help="spike: when the batch comes online")
    shape.add_argument("--every", default=None, help="factory: seconds between batches")
    shape.add_argument("--base-rate", type=float, default=None, help="spike: background")
    dist = p.add_argument_group("Locust processes")
    dist.add_argument("--workers", type=int, default=0,
                      help="distributed mode: a master and N workers on this machine")
    dist.add_argument("--master", action="store_true",
                      help="only the master; workers join from elsewhere "
                           "(locust -f loadtests/locustfile.py --worker --master-host HOST)")
    dist.add_argument("--expect-workers", type=int, default=1, help="with --master")
    dist.add_argument("--master-bind-host", default="127.0.0.1",
                      help="with --master: the address workers reach (0.0.0.0 for all)")
    dist.add_argument("--master-port", type=int, default=0, help="0: a free port")
    dist.add_argument("--locust-arg", action="append", default=[], metavar="ARG",
                      help="extra Locust argument (repeatable, e.g. --locust-arg=--loglevel=DEBUG)")
    out = p.add_argument_group("results")
    out.add_argument("--reports-dir", type=Path, default=Path("reports"))
    out.add_argument("--run-id", default=None, help="default: a new timestamped id")
    out.add_argument("--truth-sample", type=int, default=0,
                     help="check N random successes at the endpoint (0: all)")
    out.add_argument("--no-truth", action="store_true", help="skip the endpoint check")
    out.add_argument("--keep", action="store_true", help="no teardown (inspect the fleet)")
    out.add_argument("--verbose", action="store_true", help="stream Locust's output")
    p.add_argument("--log-level", default="WARNING")


def _add_quota_options(p: argparse.ArgumentParser) -> None:
    """``--quotas``/``--quota``, validated as the emulator validates them when it has
    quotas; passed to ``fleetbench emulator`` as given."""
    try:
        from harness.emulator.quotas import add_quota_arguments
    except ImportError:  # an emulator without quotas: the options still pass through
        p.add_argument("--quotas", default=None, metavar="PRESET",
                       help="passed to the emulator as --quotas (aws: AWS's default quotas)")
        p.add_argument("--quota", action="append", default=[], metavar="API=N/s",
                       help="passed to the emulator as --quota (repeatable)")
    else:
        add_quota_arguments(p)


# --------------------------------------------------------------------------- commands


def emulator_args(args: argparse.Namespace) -> list[str]:
    """What ``fleetbench emulator`` is given for this run (quotas and extras)."""
    extra: list[str] = []
    if args.quotas:
        extra += ["--quotas", args.quotas]
    for quota in args.quota:
        extra += ["--quota", quota]
    for item in args.emulator_arg:
        extra += item.split()
    return extra


def _fleet_options(args: argparse.Namespace, run_id: str, endpoint_file: Path | None) -> list[str]:
    choice = FLOWS[args.flow]
    opts = [
        "--fleet-run-id", run_id, "--fleet-reports-dir", str(args.reports_dir),
        "--fleet-shape", args.shape, "--fleet-rate", str(args.rate),
        "--fleet-duration", str(args.duration), "--fleet-format", args.format,
        "--fleet-mqtt", str(args.mqtt), "--fleet-trusted-cert", choice.trusted_cert,
        "--fleet-hold", str(args.hold), "--fleet-max-attempts", str(args.max_attempts),
        "--fleet-claim-key", args.claim_key, "--fleet-ramp-from", str(args.ramp_from),
        "--fleet-truth-sample", str(args.truth_sample), "--fleet-subscribe", args.subscribe,
    ]
    optional = {"--fleet-pacing": args.pacing, "--fleet-ramp-to": args.ramp_to,
                "--fleet-ramp-time": args.ramp_time, "--fleet-devices": args.devices,
                "--fleet-at": args.at, "--fleet-every": args.every,
                "--fleet-base-rate": args.base_rate, "--fleet-api-token": args.api_token,
                "--fleet-aws-profile": args.aws_profile, "--fleet-aws-region": args.aws_region,
                "--fleet-role-arn": args.role_arn}
    for flag, value in optional.items():
        if value is not None:
            opts += [flag, str(value)]
    if endpoint_file is not None:
        opts += ["--fleet-endpoint", "file", "--fleet-endpoint-file", str(endpoint_file)]
    else:
        opts += ["--fleet-endpoint", "aws"]
    if args.no_truth:
        opts.append("--fleet-no-truth")
    if args.keep:
        opts.append("--fleet-keep")
    return opts


def locustfile() -> Path:
    """``loadtests/locustfile.py`` (found without importing it: importing Locust patches
    this process with gevent)."""
    import importlib.util

    spec = importlib.util.find_spec("loadtests.locustfile")
    if spec is None or spec.origin is None:
        raise UsageError("loadtests/locustfile.py is not importable (is fleetbench installed?)")
    return Path(spec.origin)


def locust_command(role: str, args: argparse.Namespace, run_dir: Path, run_id: str,
                   endpoint_file: Path | None, master_port: int | None) -> list[str]:
    """The Locust command line of one process (``role``: local, master or worker)."""
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile()), FLOWS[args.flow].user_class]
    if role == "worker":
        return [*cmd, "--worker", "--master-host", "127.0.0.1", "--master-port",
                str(master_port), *args.locust_arg]
    cmd += ["--headless", "--csv", str(run_dir / "locust"), "--csv-full-history",
            "--html", str(run_dir / "locust.html"), "--only-summary"]
    if role == "master":
        workers = args.workers or args.expect_workers
        cmd += ["--master", "--expect-workers", str(workers), "--master-bind-host",
                "127.0.0.1" if args.workers else args.master_bind_host,
                "--master-bind-port", str(master_port)]
    return cmd + _fleet_options(args, run_id, endpoint_file) + list(args.locust_arg)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise UsageError("--workers must not be negative")
    if args.workers and args.master:
        raise UsageError("--workers N starts its own workers; --master waits for others")
    if args.endpoint == "aws" and (args.quotas or args.quota or args.emulator_arg):
        raise UsageError("--quotas/--quota/--emulator-arg are emulator options")
    if args.endpoint_file is not None and (args.quotas or args.quota or args.emulator_arg):
        raise UsageError("--quotas/--quota/--emulator-arg configure an emulator started for "
                         "the run; start the --endpoint-file emulator with them instead")
    if args.endpoint_file is not None and args.endpoint == "aws":
        raise UsageError("--endpoint-file names an emulator; drop --endpoint aws")
    if args.rate <= 0:
        raise UsageError("--rate must be positive")
    from loadtests.shapes import ShapeError, build_schedule

    try:
        build_schedule({"fleet_shape": args.shape, "fleet_rate": args.rate,
                        "fleet_duration": args.duration, "fleet_pacing": args.pacing,
                        "fleet_ramp_to": args.ramp_to, "fleet_ramp_from": args.ramp_from,
                        "fleet_ramp_time": args.ramp_time, "fleet_devices": args.devices,
                        "fleet_at": args.at, "fleet_every": args.every,
                        "fleet_base_rate": args.base_rate})
    except ShapeError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _endpoint(args: argparse.Namespace) -> Iterator[Path | None]:
    """The endpoint.json Locust attaches to (None: AWS); a local emulator lives as long."""
    if args.endpoint == "aws":
        yield None
        return
    if args.endpoint_file is not None:
        if not args.endpoint_file.is_file():
            raise UsageError(f"{args.endpoint_file}: no such endpoint file")
        yield args.endpoint_file
        return
    from harness.endpoints.local import EmulatorMode, LocalEndpoint

    endpoint = LocalEndpoint.start(mode=EmulatorMode.SUBPROCESS, api_token=args.api_token,
                                   extra_args=emulator_args(args))
    try:
        yield endpoint.data_dir / "endpoint.json"
    finally:
        endpoint.close()


class _Processes:
    """Locust's processes for one run; their output goes to ``run_dir/*.log``."""

    def __init__(self, run_dir: Path, verbose: bool, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.verbose = verbose
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes] | None]] = []

    def start(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        log_file: IO[bytes] | None = None
        if self.verbose:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)
        else:
            log_file = (self.run_dir / f"{name}.log").open("wb")
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log_file))
        return proc

    def interrupt(self) -> None:
        for _name, proc, _log in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        deadline = time.monotonic() + 20
        for _name, proc, _log in self.procs:
            if proc.poll() is None:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        for _name, _proc, log_file in self.procs:
            if log_file is not None:
                log_file.close()

    def tail(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])


def _run_locust(args: argparse.Namespace, run_dir: Path, run_id: str,
                endpoint_file: Path | None) -> tuple[int, _Processes]:
    env = dict(os.environ)
    if endpoint_file is not None:
        # loopback by IP: gevent's thread-pool resolver would cost a thread hop per connect
        env.setdefault("GEVENT_RESOLVER", "block")
    procs = _Processes(run_dir, args.verbose, env)
    distributed = bool(args.workers) or args.master
    port = (args.master_port or _free_port()) if distributed else None
    master = procs.start("locust-master" if distributed else "locust",
                         locust_command("master" if distributed else "local", args, run_dir,
                                        run_id, endpoint_file, port))
    for i in range(args.workers):
        procs.start(f"locust-worker-{i + 1}",
                    locust_command("worker", args, run_dir, run_id, endpoint_file, port))
    try:
        code = master.wait()
    except KeyboardInterrupt:
        print("fleetbench: interrupted; Locust stops the test and cleans up...",
              file=sys.stderr)
        procs.interrupt()
        try:
            code = master.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            code = EXIT_FAILED
    finally:
        procs.stop()
    return code, procs


def run_load(args: argparse.Namespace) -> int:
    """Run the load test the arguments describe; print its summary; the exit status."""
    from harness.reporting.records import new_run_id
    from harness.reporting.writer import ReportError, load_run
    from loadtests.report import summary_lines

    try:
        _check(args)
    except UsageError as exc:
        print(f"fleetbench load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run_id = args.run_id or new_run_id()
    run_dir = Path(args.reports_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _endpoint(args) as endpoint_file:
            code, procs = _run_locust(args, run_dir, run_id, endpoint_file)
    except UsageError as exc:
        print(f"fleetbench load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # the emulator would not start, for example
        print(f"fleetbench load: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        record = load_run(run_dir)
    except ReportError as exc:
        name = "locust-master" if (args.workers or args.master) else "locust"
        print(f"fleetbench load: no results ({exc}); Locust exited with {code}; "
              f"end of {run_dir / (name + '.log')}:\n{procs.tail(name)}", file=sys.stderr)
        return EXIT_USAGE if code == EXIT_USAGE else EXIT_FAILED
    for line in summary_lines(record):
        print(line)
    print(f"reports: {run_dir}/ (results.json, report.html, locust_stats.csv, "
          "locust_stats_history.csv, locust.html)")
    if not (run_dir / "locust_stats.csv").exists():
        print(f"fleetbench load: warning: Locust wrote no CSV in {run_dir}", file=sys.stderr)
    truth = (record.load.settings.get("truth") if record.load else None) or {}
    totals = (record.load.settings.get("totals") if record.load else None) or {}
    failed = bool(totals.get("failed")) or (bool(truth) and not truth.get("ok", True))
    if code not in (EXIT_OK, EXIT_FAILED):
        return EXIT_USAGE
    return EXIT_FAILED if failed or code != EXIT_OK else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.load_cli ...`` (the same as ``fleetbench load ...``)."""
    parser = argparse.ArgumentParser(prog="fleetbench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_load_parser(sub)
    args = parser.parse_args(["load", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    return run_load(args)


if __name__ == "__main__":
    sys.exit(main())
