"""A server under test as a subprocess on loopback: started, waited for, measured, stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Launch:
    """How to start one server and talk to it: `model` is what requests name, `ready_path` answers 200
    once it can serve, `force_length` are the request fields that make it emit exactly max tokens."""
    label: str
    argv: list[str]
    env: dict[str, str]
    model: str
    ready_path: str
    force_length: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Served:
    base_url: str
    process: subprocess.Popen
    launch: Launch

    def rss_mib(self) -> float:
        """Resident memory of the server and its children (MiB), from /proc."""
        return sum(_rss_kib(pid) for pid in _tree(self.process.pid)) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            todo += [int(c) for c in children]
    return pids


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:  # exited meanwhile
        pass
    return 0


@contextmanager
def serving(launch: Launch, log_path: Path, start_timeout_s: float = 600) -> Iterator[Served]:
    """Start `launch` (its output to log_path), wait until ready_path answers 200, yield, then stop it
    (SIGTERM, SIGKILL after 60 s). A process that exits before it is ready raises RuntimeError with the
    last line of its log."""
    port = launch.argv[launch.argv.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(launch.argv, cwd=REPO, env={**os.environ, **launch.env}, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
                    raise RuntimeError(f"{launch.label} exited {proc.returncode} before it was ready: "
                                       f"{lines[-1] if lines else '(no output)'}")
                try:
                    if httpx.get(base + launch.ready_path, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{launch.label} was not ready after {start_timeout_s:.0f} s (log {log_path})")
                time.sleep(0.5)
            yield Served(base, proc, launch)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def warm_up(server: Served, dataset: Path, max_tokens: int) -> None:
    """One request from the dataset, streamed to the end, before anything is timed (first-call work:
    lazy initialisation, allocator growth). Raises RuntimeError when the server refuses it."""
    row = json.loads(dataset.read_text().splitlines()[0])
    body = {"model": server.launch.model, "stream": True, "max_completion_tokens": max_tokens, "temperature": 0,
            **server.launch.force_length,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": row["image"]}},
                                                      {"type": "text", "text": row["text"]}]}]}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.launch.label} refused the warm-up request: {response.status_code} "
                               f"{response.read().decode(errors='replace')[:300]}")
        for _ in response.iter_lines():
            pass
