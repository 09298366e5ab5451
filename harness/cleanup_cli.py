"""``fleetbench cleanup --prefix P``: remove a crashed or interrupted run's leftovers.

Uses the same teardown as the pytest plugin (:func:`harness.teardown.cleanup_prefix`)
against an emulator (``--endpoint-file endpoint.json``) or an AWS account
(``--endpoint aws`` with the standard boto3 credential chain). Exit status 0 when
nothing is left, 1 when leftovers remain (they are listed), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_LEFTOVERS, EXIT_USAGE = 0, 1, 2


def add_cleanup_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cleanup", help="remove everything a run with this prefix created",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", required=True,
                   help="the run prefix (printed in the pytest header, e.g. fb-1a2b3c4d)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--endpoint-file", type=Path, default=None,
                       help="an emulator's endpoint.json")
    where.add_argument("--endpoint", choices=("aws",), default=None,
                       help="a real account through the boto3 credential chain")
    p.add_argument("--api-token", default=None, help="the emulator's --api-token, if it has one")
    p.add_argument("--aws-profile", default=None)
    p.add_argument("--aws-region", default=None)
    p.add_argument("--no-iam", action="store_true",
                   help="leave IAM roles alone (AWS; default removes roles named with the prefix)")
    p.add_argument("--retry-timeout", type=float, default=30.0,
                   help="seconds to retry deletes AWS makes wait (default 30)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _clients(args: argparse.Namespace) -> tuple[Any, Any]:
    """(iot, iam or None) for the chosen endpoint."""
    if args.endpoint_file is not None:
        from harness.endpoint_info import EndpointInfo
        from harness.endpoints.emulated import emulator_session

        info = EndpointInfo.read(args.endpoint_file)
        iot = emulator_session(info, args.api_token).client("iot", endpoint_url=info.api_url)
        return iot, None
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=args.aws_profile, region_name=args.aws_region)
    if not session.region_name:
        raise ValueError("no AWS region: pass --aws-region or set one in the profile")
    config = Config(retries={"max_attempts": 8, "mode": "standard"})
    iam = None if args.no_iam else session.client("iam", config=config)
    return session.client("iot", config=config), iam


def run_cleanup(args: argparse.Namespace) -> int:
    from harness.teardown import cleanup_prefix

    if args.endpoint_file is None and args.endpoint is None:
        print("fleetbench cleanup: give --endpoint-file FILE or --endpoint aws", file=sys.stderr)
        return EXIT_USAGE
    try:
        iot, iam = _clients(args)
        report = cleanup_prefix(iot, args.prefix, iam=iam, retry_timeout=args.retry_timeout)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fleetbench cleanup: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return EXIT_OK if report.ok else EXIT_LEFTOVERS


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand on its own (the ``fleetbench`` CLI wires it in too)."""
    parser = argparse.ArgumentParser(prog="fleetbench")
    add_cleanup_parser(parser.add_subparsers(dest="command", required=True))
    return run_cleanup(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
