"""Processes sharing one disk tier: one writes while the other reads, both ways; and a writer killed
with SIGKILL in the middle of its writes leaves every entry either intact or missing, never wrong,
and the directory still writable (RELIABILITY, "cache crash").

The child processes run this file as a script (`python -m tests.test_cache_processes MODE DIR START`)
so that parent and child share one definition of the features a key implies.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from cache import FeatureCache, FeatureKey, image_digest

ROOT = Path(__file__).resolve().parents[1]
PARENT_ENTRIES, CHILD_ENTRIES = 20, 30


def key_for(namespace: str, i: int) -> FeatureKey:
    return FeatureKey(image_digest(f"{namespace}-{i}".encode()), "proc-encoder", "weights-1", {"size": 32})


def features_for(namespace: str, i: int) -> dict[str, torch.Tensor]:
    """A deterministic function of the key, so any process can tell right features from wrong.
    Every third entry is large enough (45 KB) that diskcache keeps it in its own value file."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{namespace}-{i}".encode()))
    rows = 700 if i % 3 == 0 else 20
    return {
        "tokens": torch.randn(rows, 16, generator=generator),
        "pooled": torch.randn(16, generator=generator).bfloat16(),
        "index": torch.tensor([i]),
    }


def matches(got: dict[str, torch.Tensor] | None, namespace: str, i: int) -> bool:
    expected = features_for(namespace, i)
    return (
        got is not None
        and list(got) == list(expected)
        and all(got[n].dtype == expected[n].dtype and torch.equal(got[n], expected[n]) for n in expected)
    )


def open_shared(directory: Path | str) -> FeatureCache:
    """No hot tier: every read below goes to the shared directory."""
    return FeatureCache(hot_bytes=0, disk_dir=directory, disk_bytes=1 << 28, disk_timeout_s=2.0, disk_cooldown_s=0.2)


def spawn(mode: str, directory: Path, start: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_cache_processes", mode, str(directory), str(start)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
def test_two_processes_share_entries_both_ways(tmp_path: Path):
    cache = open_shared(tmp_path)
    for i in range(PARENT_ENTRIES):
        cache.put(key_for("parent", i), features_for("parent", i))
    child = spawn("exchange", tmp_path)  # checks the parent's entries, then writes its own
    for i in range(CHILD_ENTRIES):  # read each child entry as soon as it lands, while it writes more
        deadline = time.monotonic() + 60
        while (got := cache.get(key_for("child", i))) is None:
            if child.poll() not in (None, 0) or time.monotonic() > deadline:
                pytest.fail(f"entry {i} never arrived: {child.communicate()[1]}")
            time.sleep(0.01)
        assert matches(got, "child", i)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.splitlines()[0] == f"verified {PARENT_ENTRIES} of {PARENT_ENTRIES}"
    stats = cache.stats()
    assert stats["disk_corrupt_entries"] == 0 and stats["disk_read_errors"] == 0


@pytest.mark.timeout(120)
def test_sigkill_mid_write_leaves_each_entry_valid_or_missing(tmp_path: Path):
    acknowledged: dict[int, list[int]] = {}
    for start in (0, 100_000):  # two writers, killed one after the other, on the same directory
        writer = spawn("write-forever", tmp_path, start)
        acked = acknowledged[start] = []
        while len(acked) < 25:
            line = writer.stdout.readline()  # type: ignore[union-attr]
            assert line, f"writer died early: {writer.stderr.read()}"  # type: ignore[union-attr]
            acked.append(int(line))
        time.sleep(random.uniform(0, 0.05))  # land anywhere in the write loop
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        acked.extend(int(line) for line in writer.stdout.read().split())  # type: ignore[union-attr]
        assert writer.returncode == -signal.SIGKILL

    cache = open_shared(tmp_path)
    for start, acked in acknowledged.items():
        for i in range(start, max(acked) + 20):  # past the last acknowledged write: maybe half-written
            got = cache.get(key_for("crash", i))
            assert got is None or matches(got, "crash", i), f"wrong features for entry {i}"
            if i in acked:  # a committed SQLite transaction survives the death of its process
                assert got is not None, f"acknowledged entry {i} is missing"
    assert cache.stats()["disk_read_errors"] == 0

    cache.put(key_for("after", 0), features_for("after", 0))  # still writable ...
    assert matches(open_shared(tmp_path).get(key_for("after", 0)), "after", 0)  # ... and readable anew


def child_main(mode: str, directory: str, start: int) -> None:
    cache = open_shared(directory)
    if mode == "exchange":
        good = sum(matches(cache.get(key_for("parent", i)), "parent", i) for i in range(PARENT_ENTRIES))
        print(f"verified {good} of {PARENT_ENTRIES}", flush=True)
        for i in range(CHILD_ENTRIES):
            cache.put(key_for("child", i), features_for("child", i))
        sys.exit(0 if good == PARENT_ENTRIES else 3)
    elif mode == "write-forever":  # until killed; acknowledges each write that reached the disk
        for i in range(start, start + 1_000_000):
            before = cache.stats()["disk_writes"]
            cache.put(key_for("crash", i), features_for("crash", i))
            if cache.stats()["disk_writes"] == before + 1:
                print(i, flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
