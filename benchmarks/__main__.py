"""Run every benchmark module (or those named on the command line): python -m benchmarks [name ...]."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or names
    for name in wanted:
        start = time.perf_counter()
        print(f"=== {name}")
        importlib.import_module(f"benchmarks.{name}").main()
        print(f"=== {name} done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
