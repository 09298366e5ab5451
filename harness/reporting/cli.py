"""``fleetbench report``: re-render a run's report or compare two runs.

``harness/cli.py`` owns the ``fleetbench`` command and calls
:func:`add_report_parser` and :func:`run_report`; ``python -m
harness.reporting.cli`` runs the same thing standalone.

    fleetbench report [DIR]                 re-render DIR (default: latest) from results.json
    fleetbench report --compare A B         A (baseline) and B side by side, as text
    fleetbench report --compare A B --html F    ... and as a page written to F
    fleetbench report ... --open            open the page in a browser

DIR, A and B may be a run directory, its results.json, a run id or ``latest``
(looked up under ``--reports-dir``).
"""

from __future__ import annotations

import argparse
import sys
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.reporting.compare import compare_runs, render_compare_html, render_compare_text
from harness.reporting.writer import ReportError, load_run, rerender, resolve_run_dir

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_USAGE = 2


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command to an ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="re-render a run's report from results.json, or compare two runs",
        description="Re-render report.html and junit.xml of a run from its results.json, "
                    "or show two runs side by side (rates, percentiles, newly failing "
                    "scenarios).",
    )
    parser.add_argument("dir", nargs="?", default=None,
                        help="run directory, results.json, run id or 'latest' (default: latest)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare baseline run A with newer run B")
    parser.add_argument("--html", metavar="FILE", type=Path, default=None,
                        help="with --compare: also write the comparison page to FILE")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="with --compare: exit 1 when B has newly failing scenarios")
    parser.add_argument("--open", action="store_true", help="open the page in a web browser")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"),
                        help="where run directories live (default: reports)")
    parser.set_defaults(func=run_report)
    return parser


def _open(path: Path) -> None:
    if not webbrowser.open(path.resolve().as_uri()):
        print(f"fleetbench report: no browser to open {path}", file=sys.stderr)


def _compare(args: argparse.Namespace) -> int:
    a_ref, b_ref = args.compare
    a = load_run(resolve_run_dir(a_ref, args.reports_dir))
    b = load_run(resolve_run_dir(b_ref, args.reports_dir))
    comparison = compare_runs(a, b)
    sys.stdout.write(render_compare_text(comparison))
    page_path: Path | None = args.html
    if page_path is None and args.open:
        page_path = args.reports_dir / f"compare-{a.run_id}-vs-{b.run_id}.html"
    if page_path is not None:
        page_path.parent.mkdir(parents=True, exist_ok=True)
        page_path.write_text(render_compare_html(comparison), encoding="utf-8")
        print(f"comparison page: {page_path}")
        if args.open:
            _open(page_path)
    if args.fail_on_regression and comparison.newly_failing:
        return EXIT_REGRESSION
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    """Run ``fleetbench report`` with parsed ``args``; returns the exit status."""
    try:
        if args.compare:
            if args.dir is not None:
                print("fleetbench report: give either DIR or --compare A B, not both",
                      file=sys.stderr)
                return EXIT_USAGE
            return _compare(args)
        if args.html is not None or args.fail_on_regression:
            print("fleetbench report: --html and --fail-on-regression need --compare",
                  file=sys.stderr)
            return EXIT_USAGE
        run_dir = resolve_run_dir(args.dir or "latest", args.reports_dir)
        html = rerender(run_dir)
        print(f"report: {html}")
        if args.open:
            _open(html)
        return EXIT_OK
    except ReportError as exc:
        print(f"fleetbench report: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetbench")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
