"""Two runs side by side: what got worse, what got better (``fleetbench report --compare``).

The comparison is data first (:class:`Comparison`), rendered as text for a
terminal or CI log and as a self-contained HTML page. Run A is the baseline,
run B the newer run; "newly failing" means failing in B but not in A
(passed, skipped or absent there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from harness.reporting import svg
from harness.reporting.html import fmt_time, page
from harness.reporting.records import RunRecord, ScenarioOutcome, StepStats


@dataclass(frozen=True)
class StepDelta:
    """One load step in both runs (None where a run has no such step)."""

    name: str
    a: StepStats | None
    b: StepStats | None


@dataclass(frozen=True)
class FlowRate:
    """Whole-flow throughput of a load run's time series."""

    mean: float | None
    peak: float | None
    worst_p99: float | None


@dataclass(frozen=True)
class Comparison:
    a: RunRecord
    b: RunRecord
    newly_failing: tuple[ScenarioOutcome, ...]
    fixed: tuple[ScenarioOutcome, ...]
    still_failing: tuple[ScenarioOutcome, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    steps: tuple[StepDelta, ...]
    rate_a: FlowRate
    rate_b: FlowRate


def _rate(record: RunRecord) -> FlowRate:
    series = record.load.series if record.load else ()
    if not series:
        return FlowRate(None, None, None)
    p99s = [p.p99 for p in series if p.p99 is not None]
    return FlowRate(
        mean=sum(p.flows_per_s for p in series) / len(series),
        peak=max(p.flows_per_s for p in series),
        worst_p99=max(p99s) if p99s else None,
    )


def compare_runs(a: RunRecord, b: RunRecord) -> Comparison:
    """Compare baseline ``a`` with newer ``b``."""
    by_a = {o.nodeid: o for o in a.outcomes}
    by_b = {o.nodeid: o for o in b.outcomes}
    newly: list[ScenarioOutcome] = []
    fixed: list[ScenarioOutcome] = []
    still: list[ScenarioOutcome] = []
    for nodeid, ob in by_b.items():
        oa = by_a.get(nodeid)
        was_failing = oa is not None and oa.outcome.failing
        if ob.outcome.failing:
            (still if was_failing else newly).append(ob)
        elif was_failing:
            fixed.append(ob)
    steps_a = {s.name: s for s in (a.load.steps if a.load else ())}
    steps_b = {s.name: s for s in (b.load.steps if b.load else ())}
    names = list(steps_a) + [n for n in steps_b if n not in steps_a]
    return Comparison(
        a=a,
        b=b,
        newly_failing=tuple(newly),
        fixed=tuple(fixed),
        still_failing=tuple(still),
        only_in_a=tuple(n for n in by_a if n not in by_b),
        only_in_b=tuple(n for n in by_b if n not in by_a),
        steps=tuple(StepDelta(n, steps_a.get(n), steps_b.get(n)) for n in names),
        rate_a=_rate(a),
        rate_b=_rate(b),
    )


def _num(value: float | None) -> str:
    return "—" if value is None else svg.fmt_num(round(value, 2))


def _pair(a: float | None, b: float | None) -> str:
    text = f"{_num(a)} → {_num(b)}"
    if a and b is not None:
        text += f" ({(b - a) / a * 100:+.0f}%)"
    return text


def _run_line(label: str, r: RunRecord) -> str:
    return (f"  {label}  {r.run_id}  {r.kind.value}  {r.endpoint_kind}  {r.region}  "
            f"{fmt_time(r.started_at)}")


def _why(o: ScenarioOutcome) -> str:
    return ": ".join(p for p in (o.error_code, o.error_message) if p)


_COUNTS = ("total", "passed", "failed", "error", "skipped")
_STEP_COLUMNS: tuple[tuple[str, Callable[[StepStats], float | None]], ...] = (
    ("req/s", lambda s: s.rps),
    ("p50 ms", lambda s: s.p50),
    ("p95 ms", lambda s: s.p95),
    ("p99 ms", lambda s: s.p99),
    ("failures", lambda s: s.failures),
    ("throttles", lambda s: s.throttles),
)


def _get(stats: StepStats | None, fn: Callable[[StepStats], float | None]) -> float | None:
    return None if stats is None else fn(stats)


def _outcome_list(title: str, items: Sequence[ScenarioOutcome]) -> list[str]:
    lines = [f"{title} ({len(items)}):"]
    lines += [f"  {o.outcome.value.upper():7} {o.nodeid}" + (f"  {_why(o)}" if _why(o) else "")
              for o in items]
    return lines


def render_compare_text(c: Comparison) -> str:
    """The comparison for a terminal or a CI log."""
    sa, sb = c.a.summary, c.b.summary
    lines = ["fleetbench comparison (A = baseline, B = newer)", _run_line("A", c.a),
             _run_line("B", c.b), "", f"  {'outcome':10}{'A':>8}{'B':>8}{'change':>9}"]
    for key in _COUNTS:
        va, vb = getattr(sa, key), getattr(sb, key)
        lines.append(f"  {key:10}{va:>8}{vb:>8}{vb - va:>+9}")
    lines.append("")
    lines += _outcome_list("Newly failing in B", c.newly_failing)
    lines += _outcome_list("Fixed in B", c.fixed)
    lines += _outcome_list("Still failing", c.still_failing)
    if c.only_in_a:
        lines.append(f"Only in A ({len(c.only_in_a)}): " + ", ".join(c.only_in_a))
    if c.only_in_b:
        lines.append(f"Only in B ({len(c.only_in_b)}): " + ", ".join(c.only_in_b))
    if c.steps:
        lines += ["", "Load steps (A → B):"]
        for step in c.steps:
            cells = "  ".join(f"{label} {_pair(_get(step.a, fn), _get(step.b, fn))}"
                              for label, fn in _STEP_COLUMNS)
            lines.append(f"  {step.name}: {cells}")
    if c.rate_a.mean is not None or c.rate_b.mean is not None:
        lines += ["", "Flows per second (A → B): "
                  f"mean {_pair(c.rate_a.mean, c.rate_b.mean)}, "
                  f"peak {_pair(c.rate_a.peak, c.rate_b.peak)}; "
                  f"worst p99 ms {_pair(c.rate_a.worst_p99, c.rate_b.worst_p99)}"]
    return "\n".join(lines) + "\n"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def render_compare_html(c: Comparison) -> str:
    """The comparison as one self-contained page."""
    sa, sb = c.a.summary, c.b.summary
    parts = [
        f"<header><h1>fleetbench comparison</h1><div class=\"meta\">"
        f"<span>A: <code>{escape(c.a.run_id)}</code></span>"
        f"<span>B: <code>{escape(c.b.run_id)}</code></span></div></header><main>",
        "<h2>Outcomes</h2>",
        _table(("outcome", "A", "B", "change"),
               [(k, str(getattr(sa, k)), str(getattr(sb, k)),
                 f"{getattr(sb, k) - getattr(sa, k):+d}") for k in _COUNTS], "outcomes"),
    ]
    for title, items, table_id in (("Newly failing in B", c.newly_failing, "newly-failing"),
                                   ("Fixed in B", c.fixed, "fixed"),
                                   ("Still failing", c.still_failing, "still-failing")):
        parts.append(f"<h2>{escape(title)} ({len(items)})</h2>")
        if items:
            parts.append(_table(("scenario", "outcome", "AWS error"),
                                [(o.nodeid, o.outcome.value, _why(o)) for o in items], table_id))
    if c.only_in_a or c.only_in_b:
        parts.append("<h2>Scenarios in one run only</h2>")
        parts.append(_table(("scenario", "run"), [(n, "A only") for n in c.only_in_a]
                            + [(n, "B only") for n in c.only_in_b], "only"))
    if c.steps:
        parts.append("<h2>Load steps (A → B)</h2>")
        parts.append(_table(("step", *(label for label, _ in _STEP_COLUMNS)),
                            [(s.name, *(_pair(_get(s.a, fn), _get(s.b, fn))
                                        for _, fn in _STEP_COLUMNS)) for s in c.steps],
                            "steps"))
        parts.append(_table(("flows per second", "A → B"), [
            ("mean", _pair(c.rate_a.mean, c.rate_b.mean)),
            ("peak", _pair(c.rate_a.peak, c.rate_b.peak)),
            ("worst p99 ms", _pair(c.rate_a.worst_p99, c.rate_b.worst_p99)),
        ], "rates"))
    parts.append("</main>")
    return page(f"fleetbench comparison {c.a.run_id} vs {c.b.run_id}", "".join(parts))

