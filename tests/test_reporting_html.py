"""report.html and its SVG charts: deterministic, escaped, self-contained."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace

from harness.reporting import svg
from harness.reporting.html import CSP, anchors, render_html
from tests.test_reporting_samples import load_record, scenario_record


def test_rendering_is_deterministic(tmp_path):
    record = scenario_record(tmp_path)
    assert render_html(record) == render_html(record)


def test_device_text_is_escaped_so_a_log_cannot_inject_markup(tmp_path):
    base = scenario_record(tmp_path)
    hostile = replace(base.devices[3], log_excerpt='</pre><script>alert("x")</script>',
                      thing_name="<b>thing</b>")
    html = render_html(replace(base, devices=(*base.devices[:3], hostile, *base.devices[4:])))
    assert '<script>alert("x")</script>' not in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "<b>thing</b>" not in html
    assert len(re.findall(r"<script>", html)) == 2  # the page's own two checks


def test_the_page_forbids_every_fetch_and_references_nothing_external():
    html = render_html(load_record())
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in html
    assert "default-src 'none'" in CSP
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_failing_cases_come_before_passing_ones_in_the_scenario_table(tmp_path):
    html = render_html(scenario_record(tmp_path))
    order = re.findall(r'<tr data-outcome="(\w+)">', html)
    assert order[:3] == ["failed", "failed", "error"] and order[-1] == "passed"


def test_anchors_are_distinct_even_when_names_slug_alike():
    ids = anchors(["a/b", "a:b", "a b"])
    assert ids == {"a/b": "a-b", "a:b": "a-b-2", "a b": "a-b-3"}


def test_nice_ticks_cover_the_range_with_round_steps():
    ticks = svg.nice_ticks(0.0, 153.0)
    assert ticks[0] <= 0 and ticks[-1] >= 153
    assert len({round(b - a, 6) for a, b in itertools.pairwise(ticks)}) == 1
    assert svg.nice_ticks(5.0, 5.0)[-1] >= 5.0


def test_a_line_chart_leaves_gaps_for_missing_values_and_says_when_empty():
    chart = svg.line_chart("c", "t", [svg.Line("p99", "#000", [(0, 1.0), (1, None), (2, 3.0),
                                                               (3, 4.0)])],
                           x_label="s", y_label="ms")
    assert chart.count("<polyline") == 1 and chart.count("<circle") == 1
    empty = svg.line_chart("e", "t", [svg.Line("x", "#000", [])], x_label="s", y_label="ms")
    assert "no data" in empty and 'class="chart"' in empty


def test_a_timeline_draws_instants_as_markers():
    chart = svg.timeline("t", "dev", [svg.Span("connect", 0.0, 0.01, True),
                                      svg.Span("registered", 0.02, None, True),
                                      svg.Span("register", 0.01, 0.01, False)])
    assert chart.count('<rect class="step"') == 2 and chart.count('<path class="step"') == 1
    assert svg.FAIL_COLOR in chart
