"""schemathesis against the app's own OpenAPI schema, through a real server process on loopback: whatever it
generates (valid and invalid bodies, query strings, multipart files, odd methods), no answer is a 5xx, and
every answer matches what the schema says of it: a documented status, its content type, its body (OpenAI's
error shape included, app/errors.py `document_errors`).

Bounded here (MMSERVE_FUZZ_EXAMPLES per operation, 3 by default); `python -m bench.fuzz` runs the same
checks over thousands of requests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from bench.server_process import Launch, free_port, serving

EXAMPLES = int(os.environ.get("MMSERVE_FUZZ_EXAMPLES", "3"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MMSERVE = str(Path(sys.executable).parent / "mmserve")


def fuzz_launch(data_dir: Path) -> Launch:
    """The bundled demo model on a free port, its batches and files under data_dir."""
    return Launch("mmserve", [MMSERVE, "serve", "--port", str(free_port())],
                  {"MMSERVE_THREADS": "1", "MMSERVE_DATA_DIR": str(data_dir)}, "mmserve-demo", "/health")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    with serving(fuzz_launch(data), data / "server.log", start_timeout_s=300) as served:
        yield schemathesis.openapi.from_url(served.base_url + "/schema/openapi.json")


def test_no_5xx_and_every_answer_matches_the_schema(api):
    """Every operation of the schema, EXAMPLES generated cases each. (schemathesis' own pytest plugin,
    `from_fixture`, breaks under pytest 9: hypothesis is driven here directly, one operation at a time.)"""
    failures, operations = {}, 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=120)

        try:
            check()
        except Exception as e:  # noqa: BLE001 - each operation's failure is collected, then all reported
            failures[operation.label] = str(e)[:2000]
    assert operations >= 14, f"the schema lists {operations} operations"
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())
