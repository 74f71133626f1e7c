"""What every benchmark does with its figures: a table on stdout, a JSON file, a section of RESULTS.md.

RESULTS.md keeps one section per benchmark (between marker comments), replaced on each run, with
the command that produced it and the machine it ran on, so the file always shows the latest figures.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {device}")


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table (it reads fine on a terminal too)."""
    columns = columns or list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def publish(name: str, command: str, summary: dict, sections: list[tuple[str, str]], write_md: bool = True,
            details: dict | None = None) -> None:
    """Print the sections, write results/<name>.json, replace this benchmark's section of RESULTS.md,
    and print `summary` as one JSON line, last (what scripts and CI read). `details` (every row behind
    the summary) goes to the JSON file only."""
    for title, body in sections:
        print(f"\n## {title}\n{body}")
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record = {"benchmark": name, "command": command, "when": stamp, "machine": machine(), "summary": summary}
    if details is not None:
        record["details"] = details
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    if write_md:
        _update_results_md(name, command, stamp, summary, sections)
    print(json.dumps(summary), flush=True)


def _update_results_md(name: str, command: str, stamp: str, summary: dict, sections) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    body = [begin, f"## `{name}`", "", f"Command: `{command}`  ", f"Run: {stamp} on {machine()}", ""]
    for title, text in sections:
        body += [f"### {title}", "", text, ""]
    body += ["Summary: `" + json.dumps(summary) + "`", end]
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else (
        "# Benchmark results\n\nThe latest run of each benchmark, written by the benchmark itself.\n\n")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + "\n".join(body) + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    RESULTS_MD.write_text(text)


def command_line() -> str:
    return "python -m " + ".".join(Path(sys.argv[0]).with_suffix("").parts[-2:]) + " " + " ".join(sys.argv[1:])
