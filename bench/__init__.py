"""Benchmarks: `python -m bench.<name>` prints a table, writes JSON, and adds rows to bench/RESULTS.md."""
