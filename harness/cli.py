"""The ``fleetbench`` command.

Subcommands register themselves from their own modules (``add_*_parser`` /
``run_*``); this file only wires them together and keeps exit codes consistent:
0 success, 1 a failed run or flow, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("fleetbench.cli")


def _parse_hook(spec: str) -> tuple[str, str]:
    arn, sep, target = spec.partition("=")
    if not sep or not arn or not target:
        raise argparse.ArgumentTypeError(f"--hook expects ARN=TARGET, got {spec!r}")
    from harness.emulator.hooks import HookTargets

    try:  # a bad ARN or target is a usage error now, not a traceback once the loop runs
        HookTargets({arn: target})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return arn, target


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port 0-65535 (0 = a free port), got {text!r}")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _parse_broker_setting(spec: str) -> tuple[str, object]:
    """``NAME=VALUE`` for one :class:`BrokerSettings` field; VALUE is JSON (``true``, ``5``,
    ``null``, ``"x"``) or a bare string, converted to the field's enum where it has one."""
    import dataclasses
    import enum

    from harness.emulator.broker_settings import BrokerSettings

    name, sep, raw = spec.partition("=")
    fields = {f.name: f for f in dataclasses.fields(BrokerSettings)}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(
            f"--broker-setting expects NAME=VALUE with NAME a BrokerSettings field, got {spec!r}")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    default = getattr(BrokerSettings(), name)
    try:
        if isinstance(default, enum.Enum):
            value = type(default)(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--broker-setting {name}: {exc}") from exc
    return name, value


def add_emulator_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("emulator", help="run the emulated AWS IoT endpoint in the foreground")
    p.add_argument("--host", default="127.0.0.1", help="MQTT bind address (default 127.0.0.1)")
    p.add_argument("--mqtt-port", type=_port, default=8883, help="MQTT/TLS port, 0 = free port")
    p.add_argument("--api-port", type=_port, default=8443, help="control-plane port, 0 = free port")
    p.add_argument("--api-host", default="127.0.0.1",
                   help="control-plane bind address (default 127.0.0.1; use --api-token beyond it)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="keeps CA, server certificate and registry; default a fresh temp dir")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--account-id", default="123456789012")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--hook", action="append", default=[], type=_parse_hook, metavar="ARN=TARGET",
                   help="map a pre-provisioning hook Lambda ARN to python:mod:func, "
                        "http(s)://url or cmd:command (repeatable)")
    p.add_argument("--api-token", default=None,
                   help="refuse control-plane requests not carrying this token / signed with it")
    p.add_argument("--explain-refusals", action="store_true",
                   help="answer a refused CONNECT with a CONNACK reason code instead of AWS's "
                        "silent close (emulator-only aid for firmware developers)")
    p.add_argument("--durability", choices=("normal", "full"), default="normal",
                   help="normal: acknowledged writes survive a killed emulator; full: also a "
                        "power cut (one fsync per commit)")
    p.add_argument("--key-pool-size", type=_positive, default=None, metavar="N",
                   help="RSA key pairs kept ready for CreateKeysAndCertificate (default 32; "
                        "fewer start faster)")
    p.add_argument("--key-pool-workers", type=_positive, default=None, metavar="N",
                   help="worker processes generating RSA keys for the pool (default 1, about "
                        "18 keys/s each here: the CreateKeysAndCertificate ceiling)")
    from harness.emulator.quotas import add_quota_arguments

    add_quota_arguments(p)
    p.add_argument("--faults", type=Path, default=None, metavar="PLAN.yaml",
                   help="fault plan to apply from the start (see docs/faults-and-quotas.md); "
                        "a bad plan is refused with its file:line")
    p.add_argument("--broker-setting", action="append", default=[], type=_parse_broker_setting,
                   metavar="NAME=VALUE",
                   help="set one BrokerSettings field (limits and the switches listed in README's "
                        "'Where the emulator guesses'), e.g. publish_rate_per_connection=null")
    p.add_argument("--log-level", default="INFO")


def _raise_open_file_limit() -> None:
    """A broker holds one descriptor per connection: lift the soft limit toward the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def run_emulator(args: argparse.Namespace) -> int:
    from harness.emulator.app import Emulator, EmulatorConfig
    from harness.emulator.faults import FaultPlanError, load_fault_plan
    from harness.emulator.quotas import quotas_from_args

    try:
        faults = load_fault_plan(args.faults) if args.faults is not None else None
    except FaultPlanError as exc:  # names the file and line
        print(f"fleetbench emulator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.api_host not in ("127.0.0.1", "localhost", "::1") and not args.api_token:
        print("fleetbench: warning: control plane exposed beyond loopback without --api-token",
              file=sys.stderr)
    _raise_open_file_limit()
    overrides: dict[str, object] = dict(args.broker_setting)
    if args.explain_refusals:
        overrides["explain_refusals"] = True
    config = EmulatorConfig(
        host=args.host,
        mqtt_port=args.mqtt_port,
        api_port=args.api_port,
        api_host=args.api_host,
        data_dir=args.data_dir,
        region=args.region,
        account_id=args.account_id,
        sans=tuple(args.san),
        hooks=dict(args.hook),
        api_token=args.api_token,
        broker_overrides=overrides,
        durability=args.durability,
        key_pool_size=args.key_pool_size or EmulatorConfig.key_pool_size,
        key_pool_workers=args.key_pool_workers or EmulatorConfig.key_pool_workers,
        quotas=quotas_from_args(args),
        faults=faults,
    )
    try:
        # Built before the loop runs: it reads or creates the CA and the data dir (blocking).
        emulator = Emulator(config)
    except OSError as exc:
        print(f"fleetbench emulator: error: cannot use the data dir: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            try:
                info = await emulator.start()
            except OSError as exc:  # address in use, unknown host...
                print(f"fleetbench emulator: error: cannot listen: {exc}", file=sys.stderr)
                return EXIT_USAGE
            print(json.dumps(info.to_dict()), flush=True)
            from harness.gc_tuning import tune_gc

            tune_gc()  # after start: the CA, registry and settings leave the collections
            await stop.wait()
            return EXIT_OK
        finally:
            # Also after a failed start: key workers, threads and a temp dir are released.
            await emulator.stop()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return int(uvloop.run(main()))


#: Subcommands: name -> (module, parser-adding function, runner). Each module owns its command;
#: modules are imported only when the command line is built, so a missing optional extra
#: (Locust, labgrid) disables its command instead of breaking the others.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "emulator": ("harness.cli", "add_emulator_parser", "run_emulator"),
    "run": ("harness.run_cli", "add_run_parser", "run_run"),
    "provision": ("harness.provision_cli", "add_provision_parser", "run_provision"),
    "load": ("harness.load_cli", "add_load_parser", "run_load"),
    "report": ("harness.reporting.cli", "add_report_parser", "run_report"),
    "cleanup": ("harness.cleanup_cli", "add_cleanup_parser", "run_cleanup"),
}


Runner = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetbench",
        description="End-to-end test harness for AWS IoT fleet provisioning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, add_name, run_name) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            log.debug("command %s unavailable: %s", name, exc)
            continue
        getattr(module, add_name)(sub)
        sub.choices[name].set_defaults(fleetbench_runner=getattr(module, run_name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "WARNING")).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        runner: Runner = args.fleetbench_runner
        return runner(args)
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
