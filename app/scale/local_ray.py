"""Start (or join) the Ray cluster the --ray commands, tests and bench.scale run on.

A local cluster lives on loopback only. Ray gives its raylet a fixed 30 s to register at start; on a
loaded small machine that can run out, so a local start is tried up to `attempts` times."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger("mmserve")


def start_ray(address: str = "", num_cpus: int | None = None, attempts: int = 3) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a slow raylet
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("the local Ray node did not start in time (attempt %d of %d); trying again", attempt, attempts)
            ray.shutdown()
