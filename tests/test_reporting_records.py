"""Run records round-trip through results.json and its schema catches malformed data."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.reporting.records import (
    CertPath,
    Outcome,
    RunKind,
    RunRecord,
    ScenarioOutcome,
    new_run_id,
    runtime_versions,
)
from harness.reporting.schema import SCHEMA_VERSION, ResultsSchemaError, problems, validate
from tests.test_reporting_samples import T0, load_record, scenario_record


def test_a_scenario_run_round_trips_through_json_unchanged(tmp_path):
    record = scenario_record(tmp_path)
    data = json.loads(json.dumps(record.to_dict()))
    validate(data)
    assert RunRecord.from_dict(data) == record
    assert data["schema_version"] == SCHEMA_VERSION


def test_a_load_run_round_trips_with_series_and_histograms():
    record = load_record()
    data = json.loads(json.dumps(record.to_dict()))
    validate(data)
    again = RunRecord.from_dict(data)
    assert again == record
    assert again.load is not None and len(again.load.series) == 31
    assert again.load.histograms[0].buckets[-1].high is None


def test_summary_counts_each_outcome(tmp_path):
    summary = scenario_record(tmp_path).summary
    assert (summary.total, summary.passed, summary.failed, summary.error, summary.skipped) == (
        11, 7, 2, 1, 1)


def test_wire_strings_become_enums():
    # the pytest plugin hands over pytest's strings; the record stores enums
    outcome = ScenarioOutcome(nodeid="a::b", name="b", outcome="failed",  # type: ignore[arg-type]
                              cert_path="csr")  # type: ignore[arg-type]
    assert outcome.outcome is Outcome.FAILED and outcome.outcome.failing
    assert outcome.cert_path is CertPath.CSR
    with pytest.raises(ValueError):
        ScenarioOutcome(nodeid="a::b", name="b", outcome="xfailed")  # type: ignore[arg-type]


def test_a_run_id_that_is_not_a_safe_directory_name_is_refused():
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="run_id"):
            RunRecord(run_id=bad, kind=RunKind.LOAD, endpoint_kind="aws", region="eu-west-1",
                      account=None, versions={}, started_at=T0, finished_at=T0)
    assert RunRecord(run_id=new_run_id(T0), kind=RunKind.LOAD, endpoint_kind="aws",
                     region="eu-west-1", account=None, versions={}, started_at=T0,
                     finished_at=T0).run_id.startswith("20251129T160000Z-")


def test_schema_errors_name_the_json_path(tmp_path):
    data = scenario_record(tmp_path).to_dict()
    data["outcomes"][2]["outcome"] = "maybe"
    del data["devices"][0]["trace"][1]["at"]
    found = problems(data)
    assert any(p.startswith("$.outcomes[2].outcome") for p in found)
    assert any(p.startswith("$.devices[0].trace[1]") and "'at'" in p for p in found)
    with pytest.raises(ResultsSchemaError):
        validate(data)


def test_schema_checks_what_json_schema_cannot(tmp_path):
    data = scenario_record(tmp_path).to_dict()
    data["summary"]["failed"] = 0
    data["outcomes"][0]["device_ids"] = ["ghost"]
    data["devices"].append(dict(data["devices"][0]))
    found = problems(data)
    assert "$.summary.failed: 0 but the outcomes give 2" in found
    assert "$.outcomes[0].device_ids: 'ghost' is not in $.devices" in found
    assert any("appears more than once" in p for p in found)


def test_unknown_fields_are_refused_so_typos_do_not_pass_silently():
    data = load_record().to_dict()
    data["load"]["steps"][0]["p999"] = 1.0
    assert any("p999" in p for p in problems(data))


def test_runtime_versions_names_python_and_this_package():
    versions = runtime_versions()
    assert "python" in versions and versions.get("fleetbench")


_names = st.text(alphabet="abcdefghij_-[]0123456789", min_size=1, max_size=12)
_outcomes = st.builds(
    ScenarioOutcome,
    nodeid=_names.map(lambda s: f"scenarios/test_x.py::{s}"),
    name=_names,
    outcome=st.sampled_from(list(Outcome)),
    duration=st.floats(min_value=0, max_value=1e4, allow_nan=False),
    flow=st.none() | st.sampled_from(["claim", "trusted_user"]),
    device_kind=st.none() | _names,
    payload_format=st.none() | st.sampled_from(["json", "cbor"]),
    cert_path=st.none() | st.sampled_from(list(CertPath)),
    error_code=st.none() | _names,
    error_message=st.none() | st.text(max_size=30),
)


@settings(max_examples=40, deadline=None)
@given(outcomes=st.lists(_outcomes, max_size=8), started=st.floats(0, 2e9))
def test_any_record_validates_and_round_trips(outcomes, started):
    record = RunRecord(run_id="r1", kind=RunKind.SCENARIOS, endpoint_kind="emulator",
                       region="us-east-1", account=None, versions={"python": "3.11"},
                       started_at=started, finished_at=started + 1, outcomes=tuple(outcomes))
    data = json.loads(json.dumps(record.to_dict()))
    validate(data)
    assert RunRecord.from_dict(data) == record
