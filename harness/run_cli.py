"""``fleetbench run``: the scenario suites, through pytest, with the run's report written.

What a user runs first (the README's main command)::

    fleetbench run [--endpoint local|aws] [--device KIND ...] [-k EXPR] [-n N|auto]
                   [--reports-dir reports] [--scenarios DIR] [-- PYTEST ARGS ...]

It runs pytest on the scenarios directory (the repository's ``scenarios/`` next to the
``harness`` package, or ``--scenarios DIR``) with the fleetbench plugin's options:
``--endpoint local`` (an emulator on free ports) and ``--device virtual`` unless told
otherwise, and ``--fleetbench-report <reports dir>``, so every run leaves
``<reports dir>/<run-id>/`` (``results.json``, ``junit.xml``, ``report.html``) and
``<reports dir>/latest``. Anything after ``--`` goes to pytest unchanged
(``-- --aws-profile lab -x``).

pytest runs as a child process: the scenarios, their emulator and their devices never
share this process, and the exit status is pytest's own (0 all passed, 1 failures,
2 and above interrupted, internal or usage errors, 5 nothing collected).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_run_parser", "default_scenarios_dir", "pytest_command", "run_run"]

EXIT_USAGE = 2
ENDPOINTS = ("local", "aws")
DEFAULT_DEVICE = "virtual"
DEFAULT_REPORTS_DIR = Path("reports")
#: The link the report writer points at the newest run (harness.reporting.writer.LATEST).
LATEST = "latest"


def default_scenarios_dir() -> Path:
    """The repository's ``scenarios/``: beside the ``harness`` package."""
    return Path(__file__).resolve().parent.parent / "scenarios"


def _workers(text: str) -> str:
    """``-n``: ``auto`` or a whole number of at least 1 (pytest-xdist's workers)."""
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {text!r}")


def add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run", help="run the scenario suites (pytest) and write the report",
        description="Run the scenario suites with pytest against the embedded emulator "
                    "(default) or an AWS account, and write reports/<run-id>/. Arguments "
                    "after -- go to pytest unchanged.")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="local",
                   help="local: an emulator on free ports (default); aws: a real account "
                        "(give --aws-profile/--aws-region after --)")
    p.add_argument("--device", action="extend", nargs="+", default=None, metavar="KIND",
                   help=f"device kind(s): virtual, sdk, process, serial (default "
                        f"{DEFAULT_DEVICE}; repeatable)")
    p.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                   help="only scenarios matching this pytest -k expression")
    p.add_argument("-n", dest="workers", type=_workers, default=None, metavar="N|auto",
                   help="run in N pytest-xdist workers (each starts its own emulator)")
    p.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR, metavar="DIR",
                   help="where reports go: DIR/<run-id>/ and DIR/latest (default reports)")
    p.add_argument("--scenarios", type=Path, default=None, metavar="DIR",
                   help="the scenarios directory (default: the repository's scenarios/)")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST ARGS",
                   help="extra pytest arguments, after --")


def pytest_command(args: argparse.Namespace, scenarios: Path, reports: Path) -> list[str]:
    """The child's command line: pytest on ``scenarios`` with the plugin's options."""
    cmd = [sys.executable, "-m", "pytest", str(scenarios), "--endpoint", args.endpoint]
    for kind in dict.fromkeys(args.device or [DEFAULT_DEVICE]):
        cmd += ["--device", kind]
    cmd += ["--fleetbench-report", str(reports)]
    if args.keyword:
        cmd += ["-k", args.keyword]
    if args.workers:
        cmd += ["-n", args.workers]
    return cmd + list(args.pytest_args)


def _latest_run(reports: Path) -> Path | None:
    """The run ``reports/latest`` leads to (a link, or a copy when links are refused)."""
    latest = reports / LATEST
    if latest.is_symlink():
        return (reports / os.readlink(latest)).resolve()
    return latest if latest.is_dir() else None


def _usage_problem(args: argparse.Namespace, scenarios: Path) -> str | None:
    if not scenarios.is_dir():
        return f"no scenarios directory at {scenarios} (give --scenarios DIR)"
    if importlib.util.find_spec("pytest") is None:
        return "pytest is not installed (pip install 'fleetbench[dev]')"
    if args.workers and importlib.util.find_spec("xdist") is None:
        return "-n needs pytest-xdist (pip install pytest-xdist)"
    return None


def run_run(args: argparse.Namespace) -> int:
    """Run pytest on the scenarios; print where the report is; pytest's exit status."""
    scenarios = (args.scenarios or default_scenarios_dir()).resolve()
    problem = _usage_problem(args, scenarios)
    if problem is not None:
        print(f"fleetbench run: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    reports = Path(args.reports_dir).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    before = _latest_run(reports)
    before_stamp = _stamp(before)
    cmd = pytest_command(args, scenarios, reports)
    process = subprocess.Popen(cmd)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # pytest got the same SIGINT: let it tear the fleet down
        code = process.wait()
    after = _latest_run(reports)
    if after is not None and (after != before or _stamp(after) != before_stamp):
        print(f"fleetbench run: report in {after} (results.json, junit.xml, report.html); "
              f"newest run: {reports / LATEST}")
    else:
        print(f"fleetbench run: no report was written (pytest exit status {code})",
              file=sys.stderr)
    return code


def _stamp(run_dir: Path | None) -> float | None:
    """When a run's ``results.json`` was written (a copied ``latest`` keeps its name)."""
    if run_dir is None:
        return None
    try:
        return (run_dir / "results.json").stat().st_mtime
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.run_cli ...`` (the same as ``fleetbench run ...``)."""
    parser = argparse.ArgumentParser(prog="fleetbench")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    return run_run(parser.parse_args(["run", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
