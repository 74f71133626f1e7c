"""The docker-compose deployment: the compose file validates (with Debian's docker-compose, when installed:
no Docker engine runs on the development machines), and every metric the Prometheus rules and the Grafana
dashboard read is one mmserve exports (app/metrics.py), with the labels they group by."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from prometheus_client.metrics import MetricWrapperBase

from app.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# Defined on the canary branch (app/canary/, merged separately); once app/metrics.py has them this set is
# checked like the rest (see the last assertion of test_every_metric_used_is_exported).
CANARY = {"mmserve_canary_requests_total": {"model", "version", "role", "outcome"},
          "mmserve_rollbacks_total": {"model", "trigger"}}


def exported() -> dict[str, set[str]]:
    """Every series name mmserve exports -> its label names (histograms' buckets add `le`)."""
    names: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(metric._type, [""])
            for suffix in suffixes:
                names[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def rules() -> list[dict]:
    return yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]


def dashboard_exprs() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "mmserve.json").read_text())
    return [t["expr"] for panel in board["panels"] for t in panel["targets"]]


def used(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels grouped by or matched on) for each raw mmserve metric in a PromQL expression."""
    found = []
    for match in re.finditer(r"(mmserve_[a-z_]+)(\{[^}]*\})?", expr):
        labels = set(re.findall(r"(\w+)\s*=~?", match.group(2) or ""))
        found.append((match.group(1), labels))
    grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for label in by.split(",")}
    return [(name, labels | grouped) for name, labels in found]


def test_every_metric_used_is_exported_with_the_labels_grouped_by():
    have = exported()
    recorded = {rule["record"] for rule in rules()}
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    missing = []
    for expr in exprs:
        for name, labels in used(expr):
            known = have.get(name, CANARY.get(name))
            if known is None:
                missing.append(name)
            else:
                assert labels <= known, f"{expr!r} groups {name} by {labels - known}, which it does not carry"
    assert not missing, f"metrics not exported by app/metrics.py: {sorted(set(missing))}"
    # recording rules the dashboard reads are defined
    for expr in dashboard_exprs():
        for name in re.findall(r"mmserve:[a-z_0-9:]+", expr):
            assert name in recorded, f"the dashboard reads {name}, which no rule records"
    assert set(CANARY) & set(have) in (set(), set(CANARY)), "half the canary metrics: update CANARY"
    if set(CANARY) <= set(have):
        assert all(have[name] >= labels for name, labels in CANARY.items())


def test_the_dashboard_has_the_panels_operators_look_for():
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "mmserve.json").read_text())
    titles = " | ".join(panel["title"] for panel in board["panels"]).lower()
    for what in ("latency", "first token", "tokens/s", "cache hit", "failure", "out-of-memory", "router",
                 "canary split", "rollback"):
        assert what in titles, what
    for q in ("p50", "p95", "p99"):
        assert any(f"request_latency_seconds:{q}" in e for e in dashboard_exprs())
        assert any(f"time_to_first_token_seconds:{q}" in e for e in dashboard_exprs())


def test_prometheus_scrapes_the_compose_service_and_loads_the_rules():
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"mmserve:{compose['services']['mmserve']['environment']['MMSERVE_PORT']}"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.endswith(":" + prometheus["rule_files"][0] + ":ro") for m in mounts)
    mmserve = compose["services"]["mmserve"]
    data = mmserve["environment"]["MMSERVE_DATA_DIR"]
    assert any(v.split(":")[1] == data for v in mmserve["volumes"]), "the data dir is a volume"
    assert mmserve["environment"]["MMSERVE_FEATURE_CACHE_DIR"].startswith(data + "/")


def test_the_image_runs_as_a_user_that_owns_only_its_data_dir():
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    assert f"chown -R {users[-1]}:{users[-1]} /data" in dockerfile and "MMSERVE_DATA_DIR=/data" in dockerfile


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed "
                    "(Debian: apt-get install docker-compose); no Docker engine is needed to validate")
def test_docker_compose_config_validates():
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
