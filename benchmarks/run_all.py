"""Run every benchmark with its defaults and write its section of docs/benchmarks.md.

    python benchmarks/run_all.py                      # all of them (hours on 2 CPU cores)
    python benchmarks/run_all.py dag_parse training   # some of them

Each benchmark runs in its own process, one after the other (they measure time and memory, so
they must not share the machine); the first failure stops the run with its exit code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Cheapest first, so a broken setup shows early.
BENCHMARKS = ("dag_parse", "trace_lookup", "history", "training", "tiling", "s3_tiling",
              "inference", "stack", "retrain_efficacy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    names = parser.parse_args().names or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; expected any of "
                     f"{', '.join(BENCHMARKS)}")
    for name in names:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), "--write-docs"],
                               cwd=HERE.parent)
        if code:
            sys.exit(f"{name} failed with exit code {code}")
        print(f"== {name}: {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
