"""``report.html``: one self-contained page a person reads after a run.

Everything is inline (CSS, SVG charts drawn by :mod:`harness.reporting.svg`,
two tiny scripts), and a Content-Security-Policy forbids every fetch, so the
file opens from disk, from a CI artefact store or an e-mail attachment and
looks the same. Failing cases come first, each with its AWS error, the trace
the endpoint observed and the device log side by side.

The page checks itself: a script in ``<head>`` counts script errors,
``console.error`` calls, failed resource loads and CSP violations into
``<html data-js-errors>``, and a script
at the end of ``<body>`` sets ``data-render-ok="1"``. A headless browser's
dumped DOM therefore says whether the page rendered cleanly (see
``tests/test_reporting_chromium.py``).

Rendering is deterministic: the same record always gives the same bytes.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from html import escape
from typing import Any

from harness.reporting import svg
from harness.reporting.records import (
    DeviceRecord,
    LoadSummary,
    Outcome,
    RunRecord,
    ScenarioOutcome,
)
from harness.reporting.schema import SCHEMA_VERSION

#: Longest failure text (``longrepr``) shown inline; the rest is in results.json.
LONGREPR_LIMIT = 20_000

_OUTCOME_ORDER = {Outcome.FAILED: 0, Outcome.ERROR: 1, Outcome.SKIPPED: 2, Outcome.PASSED: 3}
_NONE = "—"

CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "img-src data:; base-uri 'none'; form-action 'none'")

_ERROR_COUNTER = (
    "(function(){var d=document.documentElement,n=0,ce=console.error;"
    "d.setAttribute('data-js-errors','0');"
    "function bad(){n++;d.setAttribute('data-js-errors',String(n));}"
    "console.error=function(){bad();return ce.apply(console,arguments);};"
    "window.addEventListener('error',bad,true);"
    "window.addEventListener('unhandledrejection',bad);"
    "document.addEventListener('securitypolicyviolation',bad);})();"
)
_RENDER_OK = (
    "(function(){var d=document.documentElement;"
    "d.setAttribute('data-charts',String(document.querySelectorAll('svg.chart').length));"
    "document.querySelectorAll('pre.log').forEach(function(p){p.scrollTop=p.scrollHeight;});"
    "d.setAttribute('data-render-ok','1');})();"
)

_CSS = """
:root{--ok:#1a7f37;--bad:#cf222e;--err:#bc4c00;--skip:#6e7781;--line:#d0d7de;--bg:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;margin:0;
background:#fff}
header{background:#24292f;color:#fff;padding:16px 24px}
header h1{margin:0 0 6px;font-size:20px}
header .meta{display:flex;flex-wrap:wrap;gap:4px 20px;font-size:13px;color:#d0d7de}
header code{color:#fff}
main{padding:8px 24px 32px;max-width:1400px}
h2{border-bottom:1px solid var(--line);padding-bottom:4px;margin-top:28px}
h3{margin:0 0 6px;font-size:16px}
h4{margin:8px 0 4px;font-size:13px;color:#57606a}
.tiles{display:flex;gap:12px;flex-wrap:wrap}
.tile{border:1px solid var(--line);border-radius:6px;padding:10px 18px;min-width:110px;
background:var(--bg)}
.tile .n{font-size:28px;font-weight:700;display:block}
.tile.passed .n{color:var(--ok)}.tile.failed .n{color:var(--bad)}
.tile.error .n{color:var(--err)}.tile.skipped .n{color:var(--skip)}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--bg)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#ffebe9}
table.trace{table-layout:fixed;width:100%}
table.trace th:nth-child(1){width:28%}table.trace th:nth-child(2),
table.trace th:nth-child(3){width:12%}table.trace th:nth-child(4){width:6%}
table.trace td{word-break:break-all}
table.trace td.num{white-space:nowrap;word-break:normal}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;color:#fff;
font-weight:600}
.badge.passed{background:var(--ok)}.badge.failed{background:var(--bad)}
.badge.error{background:var(--err)}.badge.skipped{background:var(--skip)}
.case,.device{border:1px solid var(--line);border-radius:6px;padding:12px 14px;margin:12px 0}
.case.failing{border-left:4px solid var(--bad)}
.nodeid{font-family:ui-monospace,monospace;font-size:12px;color:#57606a}
.aws-error{background:#ffebe9;border-radius:4px;padding:6px 10px;margin:8px 0}
.aws-error code{font-weight:700}
.evidence{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:12px}
pre{background:var(--bg);border:1px solid var(--line);border-radius:4px;padding:8px;
font-size:12px;overflow:auto;max-height:420px;white-space:pre-wrap;word-break:break-word;
margin:4px 0}
.coords{color:#57606a;font-size:13px}
.charts{display:flex;flex-wrap:wrap;gap:16px}
svg.chart{border:1px solid var(--line);border-radius:6px;background:#fff;max-width:100%;
height:auto}
.muted{color:#6e7781}
footer{color:#6e7781;font-size:12px;padding:0 24px 24px}
@media (max-width:900px){.evidence{grid-template-columns:1fr}}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _or_none(value: Any) -> str:
    return _NONE if value in (None, "") else _e(value)


def fmt_time(epoch: float) -> str:
    """UTC wall-clock text for an epoch time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + "Z"


def fmt_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _ms(value: float | None) -> str:
    return _NONE if value is None else svg.fmt_num(round(value, 2))


def slug(text: str) -> str:
    """An id-safe form of ``text`` for anchors and chart ids."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def anchors(names: Iterable[str]) -> dict[str, str]:
    """A distinct id-safe slug per name (``a/b`` and ``a:b`` both slug to ``a-b``)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = candidate = slug(name)
        n = 2
        while candidate in used:
            candidate, n = f"{base}-{n}", n + 1
        used.add(candidate)
        out[name] = candidate
    return out


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def _clip(text: str, limit: int, where: str) -> str:
    if len(text) <= limit:
        return text
    return (f"[truncated: showing the last {limit} of {len(text)} characters; "
            f"full text in {where}]\n…" + text[-limit:])


def _badge(outcome: Outcome) -> str:
    return f'<span class="badge {outcome.value}">{outcome.value}</span>'


def _sorted_outcomes(outcomes: Iterable[ScenarioOutcome]) -> list[ScenarioOutcome]:
    return sorted(outcomes, key=lambda o: _OUTCOME_ORDER[o.outcome])


def _header(record: RunRecord) -> str:
    items = [
        ("run", record.run_id),
        ("endpoint", record.endpoint_kind),
        ("region", record.region),
        ("account", record.account or _NONE),
        ("started", fmt_time(record.started_at)),
        ("finished", fmt_time(record.finished_at)),
        ("duration", fmt_duration(record.duration)),
    ]
    meta = "".join(f"<span>{_e(k)}: <code>{_e(v)}</code></span>" for k, v in items)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(record.versions.items()))
    command = " ".join(record.command_line)
    return (
        f"<header><h1>fleetbench {_e(record.kind.value)} run "
        f"<code>{_e(record.run_id)}</code></h1><div class=\"meta\">{meta}</div>"
        f"<div class=\"meta\"><span>command: <code>{_e(command) or _NONE}</code></span></div>"
        f"<div class=\"meta\"><span>versions: {_e(versions) or _NONE}</span></div></header>"
    )


def _summary(record: RunRecord) -> str:
    s = record.summary
    tiles = "".join(
        f'<div class="tile {name}"><span class="n" id="count-{name}">{count}</span>{name}</div>'
        for name, count in (("total", s.total), ("passed", s.passed), ("failed", s.failed),
                            ("error", s.error), ("skipped", s.skipped))
    )
    groups: dict[tuple[str, str, str], Counter[Outcome]] = {}
    for o in record.outcomes:
        key = (o.flow or _NONE, o.device_kind or _NONE, o.payload_format or _NONE)
        groups.setdefault(key, Counter())[o.outcome] += 1
    rows = []
    for (flow, kind, fmt), counts in sorted(groups.items()):
        bad = counts[Outcome.FAILED] + counts[Outcome.ERROR]
        cells = "".join(f'<td class="num">{counts[o]}</td>' for o in
                        (Outcome.PASSED, Outcome.FAILED, Outcome.ERROR, Outcome.SKIPPED))
        rows.append(f'<tr{" class=bad" if bad else ""}><td>{_e(flow)}</td><td>{_e(kind)}</td>'
                    f'<td>{_e(fmt)}</td>{cells}<td class="num">{sum(counts.values())}</td></tr>')
    matrix = (
        "<table id=\"matrix\"><thead><tr><th>flow</th><th>device kind</th><th>payload format</th>"
        "<th>passed</th><th>failed</th><th>error</th><th>skipped</th><th>total</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>" if rows else
        '<p class="muted">No scenario outcomes in this run.</p>'
    )
    return (
        f'<section id="summary" data-total="{s.total}" data-passed="{s.passed}" '
        f'data-failed="{s.failed}" data-error="{s.error}" data-skipped="{s.skipped}">'
        f"<h2>Summary</h2><div class=\"tiles\">{tiles}</div>"
        f"<h4>By flow × device kind × payload format</h4>{matrix}</section>"
    )


def _trace_table(device: DeviceRecord) -> str:
    if not device.trace:
        return '<p class="muted">No trace observed.</p>'
    t0 = device.trace[0].at
    rows = []
    for step in device.trace:
        detail = json.dumps(dict(step.detail), sort_keys=True, default=str) if step.detail else ""
        mark = "✓" if step.ok else "✗"
        rows.append(
            f'<tr{"" if step.ok else " class=bad"}><td>{_e(step.name)}</td>'
            f'<td class="num">+{(step.at - t0) * 1000:.0f} ms</td>'
            f'<td class="num">{_ms(None if step.duration is None else step.duration * 1000)}</td>'
            f"<td>{mark}</td><td><code>{_e(detail)}</code></td></tr>"
        )
    return ("<table class=\"trace\"><thead><tr><th>step</th><th>at</th><th>ms</th><th>ok</th>"
            f"<th>detail</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _log_block(device: DeviceRecord) -> str:
    link = (f'<a class="full-log" href="{_e(device.log_path)}">full log: {_e(device.log_path)}</a>'
            if device.log_path else "")
    if device.log_excerpt is None:
        return f'<p class="muted">No log captured.</p>{link}'
    return f'<pre class="log">{_e(device.log_excerpt)}</pre>{link}'


def _device_timeline(device: DeviceRecord, anchor: str) -> str:
    t0 = device.trace[0].at if device.trace else 0.0
    spans = [svg.Span(step.name, step.at - t0, step.duration, step.ok) for step in device.trace]
    return svg.timeline(f"timeline-{anchor}",
                        f"{device.device_id} ({device.kind})", spans)


def _failing(record: RunRecord, ids: dict[str, str]) -> str:
    failing = [o for o in _sorted_outcomes(record.outcomes) if o.outcome.failing]
    if not failing:
        return ""
    cards = []
    for i, o in enumerate(failing):
        coords = " · ".join(
            f"{k}: {_or_none(v)}" for k, v in (
                ("flow", o.flow), ("device kind", o.device_kind),
                ("payload", o.payload_format), ("cert path", o.cert_path and o.cert_path.value),
                ("duration", fmt_duration(o.duration)))
        )
        error = ""
        if o.error_code or o.error_message:
            error = (f'<p class="aws-error">AWS error <code>{_or_none(o.error_code)}</code> '
                     f"{_e(o.error_message or '')}</p>")
        longrepr = ""
        if o.longrepr:
            text = _clip(o.longrepr, LONGREPR_LIMIT, "results.json")
            longrepr = f"<details open><summary>Failure</summary><pre>{_e(text)}</pre></details>"
        evidence = []
        for device_id in o.device_ids:
            device = record.device(device_id)
            if device is None:
                continue
            evidence.append(
                f'<div class="evidence"><div><h4>Observed trace: '
                f'<a href="#device-{ids[device_id]}">{_e(device_id)}</a> ({_e(device.kind)})</h4>'
                f"{_trace_table(device)}</div>"
                f"<div><h4>Device log</h4>{_log_block(device)}</div></div>"
            )
        cards.append(
            f'<article class="case failing" id="failing-{i}">'
            f"<h3>{_badge(o.outcome)} {_e(o.name)}</h3><div class=\"nodeid\">{_e(o.nodeid)}</div>"
            f'<div class="coords">{coords}</div>{error}{longrepr}{"".join(evidence)}</article>'
        )
    return f'<section id="failing"><h2>Failing ({len(failing)})</h2>{"".join(cards)}</section>'


def _load(load: LoadSummary) -> str:
    settings = ""
    if load.settings:
        settings = "<h4>Settings</h4><pre>" + _e(_json(dict(load.settings))) + "</pre>"
    rows = "".join(
        f"<tr{' class=bad' if s.failures else ''}><td>{_e(s.name)}</td>"
        f'<td class="num">{s.count}</td><td class="num">{s.failures}</td>'
        f'<td class="num">{s.throttles}</td><td class="num">{_ms(s.p50)}</td>'
        f'<td class="num">{_ms(s.p95)}</td><td class="num">{_ms(s.p99)}</td>'
        f'<td class="num">{_ms(s.max)}</td><td class="num">{svg.fmt_num(round(s.rps, 2))}</td></tr>'
        for s in load.steps
    )
    steps = ("<table id=\"load-steps\"><thead><tr><th>step</th><th>count</th><th>failures</th>"
             "<th>throttles</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th>"
             f"<th>req/s</th></tr></thead><tbody>{rows}</tbody></table>")
    flows = svg.line_chart(
        "chart-flows", "Flows per second",
        [svg.Line("flows/s", svg.PASS_COLOR, [(p.t, p.flows_per_s) for p in load.series])],
        x_label="seconds since start", y_label="flows/s")
    latency = svg.line_chart(
        "chart-latency", "Flow latency percentiles",
        [svg.Line(name, color, [(p.t, getattr(p, name)) for p in load.series])
         for name, color in zip(("p50", "p95", "p99"), svg.SERIES_COLORS, strict=False)],
        x_label="seconds since start", y_label="ms")
    hists = []
    hist_ids = anchors(h.api for h in load.histograms)
    for h in load.histograms:
        bars = [svg.Bar(f"{svg.fmt_num(b.low)}–{svg.fmt_num(b.high)}" if b.high is not None
                        else f"≥{svg.fmt_num(b.low)}", b.count) for b in h.buckets]
        hists.append(svg.bar_chart(f"chart-hist-{hist_ids[h.api]}", f"{h.api} latency", bars,
                                   x_label="ms", y_label="requests"))
    return (
        f'<section id="load"><h2>Load</h2>{settings}<h4>Per step</h4>{steps}'
        f'<div class="charts">{flows}{latency}</div>'
        f'<h4>Latency histogram per API</h4><div class="charts">{"".join(hists)}</div></section>'
    )


def _devices(record: RunRecord, ids: dict[str, str]) -> str:
    if not record.devices:
        return ""
    cards = []
    for d in record.devices:
        facts = " · ".join(f"{k}: {_or_none(v)}" for k, v in (
            ("kind", d.kind), ("thing", d.thing_name), ("certificate", d.certificate_id)))
        cards.append(
            f'<article class="device" id="device-{ids[d.device_id]}">'
            f"<h3>{_e(d.device_id)}</h3><div class=\"coords\">{facts}</div>"
            f'<div class="evidence"><div>{_device_timeline(d, ids[d.device_id])}</div><div>'
            f"<details><summary>Trace</summary>{_trace_table(d)}</details>"
            f"<details><summary>Inputs</summary><pre>{_e(_json(dict(d.inputs)))}</pre></details>"
            f"<details><summary>Registry state</summary>"
            f"<pre>{_e(_json(dict(d.registry_state)))}</pre></details>"
            f"<details><summary>Log</summary>{_log_block(d)}</details></div></div></article>"
        )
    return (f'<section id="devices"><h2>Devices ({len(record.devices)})</h2>'
            f'{"".join(cards)}</section>')


def _all_outcomes(record: RunRecord) -> str:
    if not record.outcomes:
        return ""
    rows = []
    for o in _sorted_outcomes(record.outcomes):
        note = (o.skip_reason if o.outcome is Outcome.SKIPPED else
                ": ".join(p for p in (o.error_code, o.error_message) if p))
        rows.append(
            f'<tr data-outcome="{o.outcome.value}"><td>{_badge(o.outcome)}</td>'
            f'<td title="{_e(o.nodeid)}">{_e(o.name)}</td><td>{_or_none(o.flow)}</td>'
            f"<td>{_or_none(o.device_kind)}</td><td>{_or_none(o.payload_format)}</td>"
            f"<td>{_or_none(o.cert_path and o.cert_path.value)}</td>"
            f'<td class="num">{fmt_duration(o.duration)}</td><td>{_e(note or "")}</td></tr>'
        )
    return ('<section id="scenarios"><h2>All scenarios</h2><table><thead><tr><th>outcome</th>'
            "<th>scenario</th><th>flow</th><th>device kind</th><th>payload</th><th>cert path</th>"
            f"<th>duration</th><th>error / skip reason</th></tr></thead><tbody>{''.join(rows)}"
            "</tbody></table></section>")


def page(title: str, body: str) -> str:
    """A complete self-contained HTML document around ``body`` (shared with comparisons)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_ERROR_COUNTER}</script>"
        f"</head><body>{body}<script>{_RENDER_OK}</script></body></html>\n"
    )


def render_html(record: RunRecord) -> str:
    """The report page of a run (secrets masked)."""
    record = record.redacted()
    ids = anchors(d.device_id for d in record.devices)
    body = (
        _header(record)
        + "<main>"
        + _summary(record)
        + _failing(record, ids)
        + (_load(record.load) if record.load is not None else "")
        + _devices(record, ids)
        + _all_outcomes(record)
        + "</main>"
        + f"<footer>fleetbench report · results.json schema {SCHEMA_VERSION} · "
        f"logs under <code>logs/</code></footer>"
    )
    return page(f"fleetbench {record.kind.value} {record.run_id}", body)

