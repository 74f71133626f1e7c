"""/metrics across Ray Serve replicas: each replica writes its own exposition to a file in a directory
its host shares (`publish`), and the gateway's /metrics merges the fresh ones, each sample labelled with
its `replica` (`merged`), so Prometheus sees every replica's series and sums them with `sum without
(replica)`. A replica that dies stops refreshing its file, which is left out once stale. No Ray here."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def publish(directory: Path, replica: str, exposition: bytes) -> None:
    """Atomically replace the replica's file: a reader never sees half of it."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{replica}.{os.getpid()}.tmp"
    tmp.write_bytes(exposition)
    os.replace(tmp, directory / f"{replica}.prom")


def withdraw(directory: Path, replica: str) -> None:
    (directory / f"{replica}.prom").unlink(missing_ok=True)


def fresh(directory: Path, max_age_s: float) -> dict[str, str]:
    """replica -> exposition text, for the files refreshed within `max_age_s`."""
    now, out = time.time(), {}
    for path in sorted(directory.glob("*.prom")) if directory.is_dir() else ():
        try:
            if now - path.stat().st_mtime <= max_age_s:
                out[path.stem] = path.read_text()
        except FileNotFoundError:  # withdrawn between the glob and the read
            continue
    return out


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merged(expositions: dict[str, str]) -> bytes:
    """One exposition with every replica's samples, a `replica` label added to each."""
    families: dict[str, Metric] = {}
    for replica, text in expositions.items():
        for family in text_string_to_metric_families(text):
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            into.samples.extend(Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                                for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)
