"""Run the benchmark suites, each in its own process (peers in their own venvs), then regenerate BENCHMARKS.md.

    python -m benchmarks [--quick] [decode long_chat quality kvpress load prefill_memory]
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common, report

SUITES = {"decode": "benchmarks.decode", "long_chat": "benchmarks.long_chat", "quality": "benchmarks.quality",
          "kvpress": "benchmarks.compression", "load": "benchmarks.load", "prefill_memory": "benchmarks.prefill_memory"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller contexts and fewer tokens (minutes, not hours)")
    parser.add_argument("suites", nargs="*", metavar="suite", help=f"any of {', '.join(SUITES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    failed = []
    for name in args.suites or list(SUITES):
        common.log(f"== {name} ==")
        started = time.perf_counter()
        proc = common.run_python(sys.executable, ["-m", SUITES[name], *(["--quick"] if args.quick else [])])
        common.log(f"== {name}: exit {proc.returncode} after {time.perf_counter() - started:.0f} s ==")
        if proc.returncode != 0:
            failed.append(name)
    report.write()  # each section names the command that produced it
    if failed:
        common.log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
