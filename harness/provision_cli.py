"""``fleetbench provision``: provision one device from the command line.

What a technician runs at a bench, and the quickest way to try a firmware build::

    fleetbench provision --endpoint-file endpoint.json --device virtual|sdk|process|serial
        [--bench FILE --board NAME] [--device-config FILE] [--flow claim|trusted-user]
        [--cert keys|csr] [--format json|cbor] [--mqtt 3|5] [--template NAME
        [--claim-cert F --claim-key F]] [--param K=V ...] [--serial S] [--workdir DIR]
    fleetbench provision --endpoint aws [--aws-profile P --aws-region R] --device ...

Without ``--template`` a demo fleet is prepared through the control plane (template,
claim policy, claim certificate, all named with a fresh prefix) and left in place so the
device's thing can be inspected; the command says so on stderr, and ``--cleanup``
removes it afterwards. With ``--template``, a claim flow needs ``--claim-cert`` and
``--claim-key``; a trusted-user flow asks CreateProvisioningClaim for a temporary claim.

It prints one JSON object: the verdict (taken from the endpoint's trace, design
principle 2), the thing name and certificate id, AWS's ``statusCode``/``errorCode``/
``errorMessage`` on a rejection, the observed trace, and the device's own result with
its log. Exit status: 0 provisioned, 1 rejected or failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEVICE_KINDS = ("virtual", "sdk", "process", "serial")
#: How long to wait for the endpoint's trace to show the end of the flow.
DEFAULT_TRACE_TIMEOUT_S = 10.0
#: Parameter the demo template names things after (harness.fleet.SERIAL_PARAMETER).
SERIAL_PARAMETER = "SerialNumber"

log = logging.getLogger("fleetbench.provision")

__all__ = ["add_provision_parser", "main", "run_provision"]


class UsageError(Exception):
    """Bad arguments or configuration: exit status 2."""


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param expects NAME=VALUE, got {text!r}")
    return name, value


def add_provision_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("provision", help="provision one device and print a JSON result",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--endpoint-file", type=Path, help="an emulator's endpoint.json")
    where.add_argument("--endpoint", choices=("aws",),
                       help="a real account through the boto3 credential chain")
    p.add_argument("--api-token", default=None, help="the emulator's --api-token, if any")
    p.add_argument("--aws-profile", default=None)
    p.add_argument("--aws-region", default=None)
    p.add_argument("--device", required=True, choices=DEVICE_KINDS)
    p.add_argument("--bench", type=Path, help="bench file (serial devices)")
    p.add_argument("--board", help="board name in the bench file (serial devices)")
    p.add_argument("--device-config", type=Path,
                   help="process device configuration (default: the reference virtual "
                        "device as a program)")
    p.add_argument("--flow", choices=("claim", "trusted-user"), default="claim")
    p.add_argument("--cert", choices=("keys", "csr"), default="keys")
    p.add_argument("--format", choices=("json", "cbor"), default="json")
    p.add_argument("--mqtt", type=int, choices=(3, 5), default=3)
    p.add_argument("--template", help="provisioning template (default: prepare a demo fleet)")
    p.add_argument("--claim-cert", type=Path, help="claim certificate (with --template)")
    p.add_argument("--claim-key", type=Path, help="claim private key (with --template)")
    p.add_argument("--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="template parameter (repeatable)")
    p.add_argument("--serial", help="device serial number (default: a random one)")
    p.add_argument("--client-id", help="claim connection client id (default <serial>-claim)")
    p.add_argument("--workdir", type=Path, help="the device's directory (default: a new one)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the flow")
    p.add_argument("--prefix", help="name prefix of the demo fleet (default fbp-<random>)")
    p.add_argument("--role-arn", help="provisioning role of the demo template (AWS: default "
                                      "creates one with IAM)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove the demo fleet (and the device's thing) afterwards")
    p.add_argument("--trace-timeout", type=float, default=DEFAULT_TRACE_TIMEOUT_S,
                   help="seconds to wait for the endpoint's trace")
    p.add_argument("--log-level", default="WARNING")


# --------------------------------------------------------------------------- steps


def _check_usage(args: argparse.Namespace) -> None:
    if args.endpoint_file is None and args.endpoint is None:
        raise UsageError("give --endpoint-file FILE (an emulator) or --endpoint aws")
    if args.device == "serial" and (args.bench is None or not args.board):
        raise UsageError("--device serial needs --bench FILE and --board NAME")
    if args.device != "serial" and (args.bench is not None or args.board):
        raise UsageError("--bench and --board are for --device serial")
    if args.device_config is not None and args.device != "process":
        raise UsageError("--device-config is for --device process")
    if (args.claim_cert is None) != (args.claim_key is None):
        raise UsageError("give both --claim-cert and --claim-key")
    if args.claim_cert is not None and args.template is None:
        raise UsageError("--claim-cert/--claim-key go with --template (without a template a "
                         "demo fleet and its claim are prepared)")
    if args.template and args.flow == "claim" and args.claim_cert is None:
        raise UsageError("a claim flow on --template needs --claim-cert and --claim-key")
    if args.device == "sdk" and args.format != "json":
        raise UsageError("--device sdk speaks JSON only (the SDK's identity clients use the "
                         "json topics)")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")


def _device(args: argparse.Namespace) -> Any:
    from devices.base import create_device

    if args.device == "serial":
        return create_device("serial", bench=args.bench, board=args.board)
    if args.device == "process" and args.device_config is not None:
        return create_device("process", config_file=args.device_config)
    return create_device(args.device)


def _endpoint(args: argparse.Namespace) -> Any:
    if args.endpoint_file is not None:
        from harness.endpoints.local import LocalEndpoint

        try:
            return LocalEndpoint.attach(args.endpoint_file, api_token=args.api_token)
        except FileNotFoundError:
            raise UsageError(f"{args.endpoint_file}: no such endpoint file") from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    from harness.endpoints.aws import AwsEndpoint

    return AwsEndpoint.from_profile(args.aws_profile, args.aws_region,
                                    prefix=args.prefix or "fleetbench")


@dataclass
class _Setup:
    template: str
    claim: Any  # devices.base.ClaimCredentials
    fleet: Any = None  # harness.fleet.Fleet when a demo fleet was prepared


def _prepare(args: argparse.Namespace, endpoint: Any, workdir: Path) -> _Setup:
    from devices.base import ClaimCredentials
    from harness import pki

    trusted = args.flow == "trusted-user"
    if args.template:
        if not trusted:
            for path in (args.claim_cert, args.claim_key):
                if not Path(path).is_file():
                    raise UsageError(f"{path}: no such file")
            return _Setup(args.template, ClaimCredentials.from_files(args.claim_cert,
                                                                     args.claim_key))
        made = endpoint.iot.create_provisioning_claim(templateName=args.template)
        directory = workdir / "trusted-user-claim"
        pki.write_public(directory / "claim.pem", made["certificatePem"])
        pki.write_secret(directory / "claim.key", made["keyPair"]["PrivateKey"])
        expiration = made.get("expiration")
        expires = expiration.timestamp() if hasattr(expiration, "timestamp") else expiration
        return _Setup(args.template, ClaimCredentials(
            directory / "claim.pem", directory / "claim.key", made["certificateId"],
            temporary=True, expiration=float(expires) if expires is not None else None))
    from harness.fleet import Fleet, FleetSpec

    prefix = args.prefix or f"fbp-{secrets.token_hex(4)}"
    is_aws = args.endpoint == "aws"
    spec = FleetSpec(prefix=prefix, role_arn=args.role_arn,
                     create_role=is_aws and args.role_arn is None,
                     workdir=workdir / "fleet", description="fleetbench provision demo fleet")
    fleet = Fleet.for_endpoint(endpoint, spec).setup()
    claim = fleet.create_trusted_user_claim() if trusted else fleet.create_claim()
    where = f"--endpoint-file {args.endpoint_file}" if args.endpoint_file else "--endpoint aws"
    print(f"fleetbench provision: no --template given, so a demo fleet was prepared: template "
          f"{fleet.template_name}, claim policy {fleet.claim_policy_name}, "
          f"{'temporary claim' if trusted else 'claim certificate'} {claim.certificate_id}. "
          + ("It is removed when the run ends (--cleanup)." if args.cleanup else
             f"It stays; remove it with: fleetbench cleanup --prefix {prefix} {where}"),
          file=sys.stderr)
    return _Setup(fleet.template_name, claim, fleet)


def _trace(endpoint: Any, client_id: str, claim_id: str, mark: Any, result: Any,
           timeout: float) -> Any:
    from harness.observer import StepKind

    until = StepKind.RECONNECTED if result.ok else (
        StepKind.REJECTED if result.error is not None else None)
    wait = timeout if until is not None else min(timeout, 1.0)
    trace = endpoint.observer.trace(client_id=client_id, since=mark, timeout=wait, until=until)
    if not trace.steps:  # the device chose its own client id: follow the claim instead
        trace = endpoint.observer.trace(certificate_id=claim_id, since=mark, timeout=wait,
                                        until=until)
    return trace


def _report(result: Any, trace: Any, trace_error: str | None, setup: _Setup,
            endpoint: Any, workdir: Path) -> tuple[dict[str, Any], bool]:
    error = result.error
    if error is None and trace is not None and trace.rejections:
        last = trace.rejections[-1]
        if last.status_code is not None:
            from harness.protocol import ErrorResponse

            error = ErrorResponse(last.status_code, last.error_code or "",
                                  last.error_message or "")
    if trace is not None:
        ok = trace.provisioned and result.ok
        verdict_source = "endpoint"
    else:
        ok = result.ok
        verdict_source = "device (the endpoint's trace was not available)"
    outcome = "provisioned" if ok else ("rejected" if error is not None else "failed")
    report: dict[str, Any] = {
        "ok": ok,
        "outcome": outcome,
        "verdict_from": verdict_source,
        "thing_name": (trace.thing_name if trace is not None else None) or result.thing_name,
        "certificate_id": (trace.certificate_id if trace is not None else None)
        or result.certificate_id,
        "statusCode": error.status_code if error else None,
        "errorCode": error.error_code if error else None,
        "errorMessage": error.error_message if error else None,
        "failure": result.failure,
        "template": setup.template,
        "claim_certificate_id": setup.claim.certificate_id,
        "demo_fleet_prefix": setup.fleet.prefix if setup.fleet is not None else None,
        "trace": trace.to_dicts() if trace is not None else None,
        "trace_error": trace_error,
        "device": result.to_dict(),
        "device_log": str(result.log_path) if result.log_path else None,
        "workdir": str(workdir),
        "endpoint": endpoint.describe(),
    }
    if not ok and trace is not None and result.ok:
        report["failure"] = ("the device reports success but the endpoint did not see a "
                             "complete provisioning")
    return report, ok


def run_provision(args: argparse.Namespace) -> int:
    """Provision one device; print the JSON report. Returns the exit status."""
    from devices.base import DeviceConfigError, DeviceInputs, EndpointParams

    try:
        _check_usage(args)
        device = _device(args)
    except (UsageError, DeviceConfigError) as exc:
        print(f"fleetbench provision: {exc}", file=sys.stderr)
        return EXIT_USAGE
    serial = args.serial or f"SN-{secrets.token_hex(4)}"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"fleetbench-provision-{serial}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    endpoint = None
    setup: _Setup | None = None
    try:
        endpoint = _endpoint(args)
        setup = _prepare(args, endpoint, workdir)
        parameters = dict(args.param)
        if setup.fleet is not None:
            parameters.setdefault(SERIAL_PARAMETER, serial)
        client_id = args.client_id or f"{serial}-claim"
        inputs = DeviceInputs(
            endpoint=EndpointParams(endpoint.mqtt_host, endpoint.mqtt_port, endpoint.ca_file,
                                    endpoint.mqtt_server_name or None),
            claim=setup.claim, template_name=setup.template, flow=args.flow,
            cert_api=args.cert, payload_format=args.format, parameters=parameters,
            client_id=client_id, serial=serial, workdir=workdir / "device",
            mqtt_version=args.mqtt, timeout_s=args.timeout)
        mark = None
        trace_error: str | None = None
        try:
            mark = endpoint.observer.mark()
        except Exception as exc:  # the verdict then falls back to the device's account
            trace_error = f"{type(exc).__name__}: {exc}"
        result = device.provision(inputs)
        trace = None
        if trace_error is None:
            try:
                trace = _trace(endpoint, client_id, setup.claim.certificate_id, mark, result,
                               args.trace_timeout)
            except Exception as exc:
                trace_error = f"{type(exc).__name__}: {exc}"
        report, ok = _report(result, trace, trace_error, setup, endpoint, workdir)
        print(json.dumps(report, indent=2, sort_keys=True))
        return EXIT_OK if ok else EXIT_FAILED
    except (UsageError, DeviceConfigError) as exc:
        print(f"fleetbench provision: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if setup is not None and setup.fleet is not None and args.cleanup:
            summary = setup.fleet.teardown().summary()
            print(f"fleetbench provision: {summary}", file=sys.stderr)
        if endpoint is not None:
            endpoint.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand on its own (``python -m harness.provision_cli provision ...``)."""
    parser = argparse.ArgumentParser(prog="fleetbench")
    add_provision_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run_provision(args)


if __name__ == "__main__":
    sys.exit(main())
