"""Benchmarks: `make bench` (python -m benchmarks) runs each bench_*.py, prints its table, writes JSON."""
