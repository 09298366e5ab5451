"""Write a run's reports to ``reports/<run-id>/`` and read them back.

:func:`write_run` is the one place a run becomes files: device logs are copied
(redacted) to ``logs/<device>.log``, the record gets those relative paths and
short log excerpts, is redacted and validated, and ``results.json``,
``junit.xml`` and ``report.html`` are rendered from that same record; then
``reports/latest`` is pointed at the run. Because the HTML and JUnit are
rendered from exactly what ``results.json`` holds, :func:`rerender` gives
byte-identical files later.

Everything here is blocking file I/O: code on an event loop calls it through
``loop.run_in_executor``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from harness.reporting.compare import compare_runs, render_compare_html, render_compare_text
from harness.reporting.html import render_html
from harness.reporting.junit import render_junit
from harness.reporting.records import DeviceRecord, RunRecord
from harness.reporting.redact import redact_text
from harness.reporting.schema import SCHEMA_VERSION, ResultsSchemaError, validate

RESULTS_JSON = "results.json"
JUNIT_XML = "junit.xml"
REPORT_HTML = "report.html"
LOGS_DIR = "logs"
LATEST = "latest"

#: Characters of a device log kept inline in results.json, junit.xml and report.html;
#: longer logs keep their tail, with a note naming the full file under ``logs/``.
LOG_EXCERPT_LIMIT = 16_000
#: Reports hold no secrets (everything is redacted), so they are world-readable like any artefact.
REPORT_FILE_MODE = 0o644


class ReportError(Exception):
    """A report directory or ``results.json`` that cannot be read; the message names the file."""


def log_file_name(device_id: str, taken: Iterable[str] = ()) -> str:
    """A safe, unique file name for a device's log (``thing/01:a`` -> ``thing_01_a.log``)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", device_id).strip("._") or "device"
    base = base[:100]
    used = set(taken)
    name, n = f"{base}.log", 2
    while name in used:
        name, n = f"{base}-{n}.log", n + 1
    return name


def excerpt(text: str, limit: int, full_log: str) -> str:
    """``text`` if it fits in ``limit`` characters, else its tail after a truncation note."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    newline = tail.find("\n", 0, 200)
    if newline != -1:
        tail = tail[newline + 1:]
    return (f"[log truncated: showing the last {len(tail)} of {len(text)} characters; "
            f"full log: {full_log}]\n{tail}")


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file so a reader never sees half a report."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, REPORT_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _full_log(device: DeviceRecord) -> str | None:
    if device.log_path:
        path = Path(device.log_path)
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    return device.log_excerpt


def _write_logs(record: RunRecord, run_dir: Path, limit: int,
                secrets: tuple[str, ...]) -> RunRecord:
    devices: list[DeviceRecord] = []
    taken: set[str] = set()
    for device in record.devices:
        full = _full_log(device)
        if full is None:
            devices.append(replace(device, log_path=None, log_excerpt=None))
            continue
        name = log_file_name(device.device_id, taken)
        taken.add(name)
        rel = f"{LOGS_DIR}/{name}"
        text = redact_text(full, secrets)
        (run_dir / LOGS_DIR).mkdir(exist_ok=True)
        _atomic_write(run_dir / rel, text)
        devices.append(replace(device, log_path=rel, log_excerpt=excerpt(text, limit, rel)))
    return replace(record, devices=tuple(devices))


def _render_into(record: RunRecord, run_dir: Path) -> None:
    _atomic_write(run_dir / JUNIT_XML, render_junit(record))
    _atomic_write(run_dir / REPORT_HTML, render_html(record))


def point_latest(reports_dir: Path, run_dir: Path) -> Path:
    """Make ``reports_dir/latest`` lead to ``run_dir``: a relative symlink, else a copy."""
    latest = reports_dir / LATEST
    tmp = reports_dir / f".{LATEST}-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        if latest.is_dir() and not latest.is_symlink():
            shutil.rmtree(latest)
        os.replace(tmp, latest)
    except OSError:
        tmp.unlink(missing_ok=True)
        if latest.is_symlink() or latest.is_file():
            latest.unlink()
        elif latest.is_dir():
            shutil.rmtree(latest)
        shutil.copytree(run_dir, latest)
    return latest


def write_run(record: RunRecord, reports_dir: Path | str = "reports", *,
              log_limit: int = LOG_EXCERPT_LIMIT, secrets: Iterable[str] = ()) -> Path:
    """Write ``results.json``, ``junit.xml``, ``report.html`` and ``logs/`` for a run.

    ``secrets`` are strings the caller knows to be secret (tokens, key PEMs);
    they are masked in addition to what :mod:`~harness.reporting.redact` finds
    by itself. Returns ``reports_dir/<run-id>``.
    """
    known = tuple(s for s in secrets if s)
    reports = Path(reports_dir)
    run_dir = reports / record.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    final = _write_logs(record, run_dir, log_limit, known).redacted(known)
    data = final.to_dict()
    validate(data)
    _atomic_write(run_dir / RESULTS_JSON, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _render_into(final, run_dir)
    point_latest(reports, run_dir)
    return run_dir


def results_path(ref: Path | str) -> Path:
    """``results.json`` of a run directory (or the file itself)."""
    path = Path(ref)
    return path if path.is_file() else path / RESULTS_JSON


def resolve_run_dir(ref: Path | str, reports_dir: Path | str = "reports") -> Path:
    """A run directory from a path, ``results.json`` path, run id or ``latest``."""
    path = Path(ref)
    if path.is_file():
        return path.parent
    if (path / RESULTS_JSON).is_file():
        return path
    candidate = Path(reports_dir) / str(ref)
    if (candidate / RESULTS_JSON).is_file():
        return candidate
    raise ReportError(f"{ref}: no {RESULTS_JSON} there or under {reports_dir}/")


def load_run(ref: Path | str) -> RunRecord:
    """The record in a run directory's ``results.json``, validated."""
    path = results_path(ref)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: not found") from exc
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc})") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ReportError(f"{path}: schema_version {version!r}, this fleetbench reads "
                          f"{SCHEMA_VERSION!r}")
    try:
        validate(data)
    except ResultsSchemaError as exc:
        raise ReportError(f"{path}: {exc}") from exc
    return RunRecord.from_dict(data)


def rerender(run_dir: Path | str) -> Path:
    """Render ``report.html`` and ``junit.xml`` again from ``results.json``; returns the HTML."""
    directory = resolve_run_dir(run_dir)
    _render_into(load_run(directory), directory)
    return directory / REPORT_HTML


def compare(a_dir: Path | str, b_dir: Path | str, *, fmt: str = "text") -> str:
    """Two runs side by side (``fmt`` ``"text"`` or ``"html"``): B is the newer run."""
    comparison = compare_runs(load_run(a_dir), load_run(b_dir))
    if fmt == "html":
        return render_compare_html(comparison)
    if fmt != "text":
        raise ValueError(f"fmt must be 'text' or 'html', not {fmt!r}")
    return render_compare_text(comparison)
