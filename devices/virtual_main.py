"""The virtual device as a program: ``python -m devices.virtual_main ...``.

The example program the ProcessDevice runs, and the shape any host-built firmware under
test is asked to have: inputs on the command line, a JSON result on stdout, exit status
0 when the device believes it is provisioned, 1 when the flow was rejected or failed,
2 for bad usage. The result is one JSON line, the last on stdout. Logs go to
``<workdir>/device.log`` (and stderr at ``--log-level``). Empty values (``--client-id ""``,
``--server-name ""``) mean "not given", so a templated command line may leave them blank.

    python -m devices.virtual_main --endpoint-file endpoint.json \\
        --claim-cert claim.pem --claim-key claim.key --template T --serial SN1 \\
        --workdir /tmp/dev1 [--cert keys|csr] [--format json|cbor] [--mqtt 3|5] \\
        [--flow claim|trusted-user] [--param K=V ...] [--stop-after STEP] [--cut-at POINT]

Instead of ``--endpoint-file``, ``--endpoint HOST --port N --ca-file F [--server-name S]``
name the endpoint directly (what ProcessDevice's ``{endpoint}``/``{port}``/``{ca_file}``
placeholders expand to).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from devices.base import (
    CertApi,
    ClaimCredentials,
    DeviceConfigError,
    DeviceInputs,
    EndpointParams,
    FaultPoint,
    Flow,
    MqttVersion,
    Step,
)
from devices.virtual import KeyType, Recovery, StepControl, VirtualDevice, VirtualOptions
from harness.protocol import PayloadFormat

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devices.virtual_main",
                                description="Run the fleetbench virtual device once "
                                            "(one boot) and print its JSON result.")
    where = p.add_argument_group("endpoint")
    where.add_argument("--endpoint-file", type=Path, help="endpoint.json of the endpoint")
    where.add_argument("--endpoint", help="MQTT host (instead of --endpoint-file)")
    where.add_argument("--port", type=int, help="MQTT port (with --endpoint)")
    where.add_argument("--ca-file", type=Path, help="CA the server certificate chains to")
    where.add_argument("--server-name", help="TLS name of the server (SNI), if not the host")
    where.add_argument("--alpn", action="append", default=[],
                       help="ALPN protocol (x-amzn-mqtt-ca for port 443); repeatable")
    p.add_argument("--claim-cert", type=Path, required=True)
    p.add_argument("--claim-key", type=Path, required=True)
    p.add_argument("--claim-expiration", type=float, default=None,
                   help="epoch seconds a trusted-user claim expires at")
    p.add_argument("--template", required=True, help="provisioning template name")
    p.add_argument("--serial", help="serial number (also the SerialNumber parameter)")
    p.add_argument("--client-id", help="client id of the claim connection")
    p.add_argument("--workdir", type=Path, required=True, help="the device's flash")
    p.add_argument("--flow", choices=[f.value for f in Flow], default=Flow.CLAIM.value)
    p.add_argument("--cert", choices=[c.value for c in CertApi], default=CertApi.KEYS.value)
    p.add_argument("--format", choices=[f.value for f in PayloadFormat],
                   default=PayloadFormat.JSON.value)
    p.add_argument("--mqtt", type=int, choices=[int(v) for v in MqttVersion],
                   default=int(MqttVersion.V3_1_1))
    p.add_argument("--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="template parameter; repeatable")
    p.add_argument("--key-type", choices=[k.value for k in KeyType],
                   default=KeyType.EC_P256.value)
    p.add_argument("--recovery", choices=[r.value for r in Recovery],
                   default=Recovery.FINISH.value)
    p.add_argument("--telemetry-topic", default=None,
                   help="topic published after provisioning ({thing_name}, {client_id}, "
                        "{serial}); 'none' to skip")
    p.add_argument("--stop-after", choices=[s.value for s in Step], default=None)
    p.add_argument("--cut-at", choices=[f.value for f in FaultPoint], default=None)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    p.add_argument("--log-level", default="WARNING")
    return p


def _endpoint(args: argparse.Namespace) -> EndpointParams:
    if args.endpoint_file is not None:
        params = EndpointParams.from_file(args.endpoint_file)
        if args.alpn:
            params = EndpointParams(params.host, params.port, params.ca_file,
                                    params.server_name, tuple(args.alpn))
        return params
    if not (args.endpoint and args.port and args.ca_file):
        raise DeviceConfigError("give --endpoint-file, or --endpoint, --port and --ca-file")
    return EndpointParams(args.endpoint, args.port, args.ca_file, args.server_name or None,
                          tuple(args.alpn))


def inputs_from_args(args: argparse.Namespace) -> tuple[DeviceInputs, VirtualOptions]:
    trusted = args.flow == Flow.TRUSTED_USER.value
    claim = ClaimCredentials.from_files(args.claim_cert, args.claim_key, temporary=trusted,
                                        expiration=args.claim_expiration)
    if not args.claim_key.is_file():
        raise DeviceConfigError(f"{args.claim_key}: no such claim key file")
    inputs = DeviceInputs(
        endpoint=_endpoint(args), claim=claim, template_name=args.template, flow=args.flow,
        cert_api=args.cert, payload_format=args.format, parameters=dict(args.param),
        client_id=args.client_id or None, serial=args.serial or None, workdir=args.workdir,
        mqtt_version=args.mqtt, timeout_s=args.timeout)
    options = VirtualOptions(
        key_type=args.key_type, recovery=args.recovery,
        control=StepControl(stop_after=args.stop_after, cut_at=args.cut_at))
    if args.telemetry_topic is not None:
        topic = None if args.telemetry_topic == "none" else args.telemetry_topic
        options = dataclasses.replace(options, telemetry_topic=topic)
    return inputs, options


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        inputs, options = inputs_from_args(args)
    except (DeviceConfigError, FileNotFoundError, ValueError) as exc:
        print(f"virtual_main: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = VirtualDevice(options).provision(inputs)
    print(result.to_json())
    return EXIT_OK if result.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
