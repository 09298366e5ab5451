"""The JSON Schema of ``results.json`` and the check every reader and writer runs.

CI systems and other tools parse ``results.json``; the schema is the contract
they rely on (documented in ``docs/results-schema.md``). :func:`validate`
checks the JSON Schema (draft 2020-12) and then what a schema cannot say: the
summary matches the outcomes, device ids are unique and outcomes only name
devices of the run. Errors name the JSON path and what was expected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

#: Version of the ``results.json`` layout; bump on any incompatible change.
SCHEMA_VERSION = "1"

_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_FREE = {"type": "object"}


def _obj(properties: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(properties),
        "additionalProperties": False,
    }


RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://fleetbench.invalid/schemas/results-1.json",
    "title": "fleetbench results.json",
    **_obj(
        {
            "schema_version": {"const": SCHEMA_VERSION},
            "run": {"$ref": "#/$defs/run"},
            "summary": {"$ref": "#/$defs/summary"},
            "outcomes": {"type": "array", "items": {"$ref": "#/$defs/outcome"}},
            "devices": {"type": "array", "items": {"$ref": "#/$defs/device"}},
            "load": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/load"}]},
        }
    ),
    "$defs": {
        "run": _obj(
            {
                "run_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
                "kind": {"enum": ["scenarios", "load"]},
                "endpoint_kind": _STR,
                "region": _STR,
                "account": _OPT_STR,
                "versions": {"type": "object", "additionalProperties": _STR},
                "started_at": _NUM,
                "finished_at": _NUM,
                "command_line": {"type": "array", "items": _STR},
            }
        ),
        "summary": _obj(
            {"total": _COUNT, "passed": _COUNT, "failed": _COUNT, "skipped": _COUNT,
             "error": _COUNT}
        ),
        "outcome": _obj(
            {
                "nodeid": {"type": "string", "minLength": 1},
                "name": _STR,
                "outcome": {"enum": ["passed", "failed", "skipped", "error"]},
                "duration": {"type": "number", "minimum": 0},
                "flow": _OPT_STR,
                "device_kind": _OPT_STR,
                "payload_format": _OPT_STR,
                "cert_path": {"enum": ["keys", "csr", None]},
                "error_code": _OPT_STR,
                "error_message": _OPT_STR,
                "skip_reason": _OPT_STR,
                "longrepr": _OPT_STR,
                "device_ids": {"type": "array", "items": _STR},
            }
        ),
        "trace_step": _obj(
            {
                "name": _STR,
                "at": _NUM,
                "duration": {"type": ["number", "null"], "minimum": 0},
                "ok": {"type": "boolean"},
                "detail": _FREE,
            }
        ),
        "device": _obj(
            {
                "device_id": {"type": "string", "minLength": 1},
                "kind": _STR,
                "inputs": _FREE,
                "trace": {"type": "array", "items": {"$ref": "#/$defs/trace_step"}},
                "registry_state": _FREE,
                "log_path": _OPT_STR,
                "log_excerpt": _OPT_STR,
                "thing_name": _OPT_STR,
                "certificate_id": _OPT_STR,
            }
        ),
        "step_stats": _obj(
            {
                "name": _STR,
                "count": _COUNT,
                "failures": _COUNT,
                "throttles": _COUNT,
                "p50": _OPT_NUM,
                "p95": _OPT_NUM,
                "p99": _OPT_NUM,
                "max": _OPT_NUM,
                "rps": {"type": "number", "minimum": 0},
            }
        ),
        "series_point": _obj(
            {
                "t": _NUM,
                "flows_per_s": {"type": "number", "minimum": 0},
                "p50": _OPT_NUM,
                "p95": _OPT_NUM,
                "p99": _OPT_NUM,
            }
        ),
        "bucket": _obj({"low": _NUM, "high": _OPT_NUM, "count": _COUNT}),
        "histogram": _obj(
            {"api": _STR, "buckets": {"type": "array", "items": {"$ref": "#/$defs/bucket"}}}
        ),
        "load": _obj(
            {
                "steps": {"type": "array", "items": {"$ref": "#/$defs/step_stats"}},
                "series": {"type": "array", "items": {"$ref": "#/$defs/series_point"}},
                "histograms": {"type": "array", "items": {"$ref": "#/$defs/histogram"}},
                "settings": _FREE,
            }
        ),
    },
}

Draft202012Validator.check_schema(RESULTS_SCHEMA)
_VALIDATOR = Draft202012Validator(RESULTS_SCHEMA)


class ResultsSchemaError(ValueError):
    """``results.json`` data does not follow the schema; ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"results.json does not follow schema {SCHEMA_VERSION}: {shown}{more}")
        self.problems = problems


def _where(path: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def problems(data: Any) -> list[str]:
    """Every way ``data`` breaks the schema or its consistency rules (empty when valid)."""
    found = [
        f"{_where(e.absolute_path)}: {e.message}"
        for e in sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.path)))
    ]
    if found:
        return found
    outcomes = data["outcomes"]
    counts = Counter(o["outcome"] for o in outcomes)
    expected = {"total": len(outcomes), **{k: counts[k] for k in
                                           ("passed", "failed", "skipped", "error")}}
    for key, value in expected.items():
        if data["summary"][key] != value:
            found.append(f"$.summary.{key}: {data['summary'][key]} but the outcomes give {value}")
    ids = [d["device_id"] for d in data["devices"]]
    for dup in sorted(k for k, n in Counter(ids).items() if n > 1):
        found.append(f"$.devices: device_id {dup!r} appears more than once")
    known = set(ids)
    for i, outcome in enumerate(outcomes):
        for device_id in outcome["device_ids"]:
            if device_id not in known:
                found.append(f"$.outcomes[{i}].device_ids: {device_id!r} is not in $.devices")
    return found


def validate(data: Any) -> None:
    """Raise :class:`ResultsSchemaError` unless ``data`` is a valid ``results.json`` document."""
    found = problems(data)
    if found:
        raise ResultsSchemaError(found)
