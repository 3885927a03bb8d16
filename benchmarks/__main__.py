"""Run the benchmark suites, each in its own process (peers in their own venvs), then regenerate BENCHMARKS.md.

    python -m benchmarks [--quick] [--no-setup] [suite ...]

Before the suites run, what they need is installed unless --no-setup: the `bench` extra into this interpreter's
environment, and the peers' venvs (benchmarks/peers/setup.sh: transformers + kvpress, llama-cpp-python built from
its sdist) for the suites that compare against them. A suite whose peer cannot be installed still runs and records
the peer as unavailable.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from benchmarks import common, report

SUITES = {"decode": "benchmarks.decode", "kv_kernel": "benchmarks.kv_kernel", "weights": "benchmarks.weights", "long_chat": "benchmarks.long_chat",
          "quality": "benchmarks.quality", "kvpress": "benchmarks.compression", "load": "benchmarks.load",
          "prefill_memory": "benchmarks.prefill_memory", "estimate_accuracy": "benchmarks.estimate_accuracy",
          "batch_decode": "benchmarks.batch_decode", "cluster": "benchmarks.cluster", "recall": "benchmarks.recall",
          "passkey_after": "benchmarks.passkey_after", "archive": "benchmarks.archive",
          "revisions": "benchmarks.revisions",
          "recall_sense": "benchmarks.recall --script conversations/sense-200-turns.jsonl --no-summarize",
          "recall_heldout": "benchmarks.recall --script conversations/heldout-200-turns.jsonl --no-summarize",
          "heldout_ppl": "benchmarks.heldout_ppl",
          "passkey_austen": "benchmarks.passkey_after --cases austen --max-tokens 4200",
          "passkey_heldout": "benchmarks.passkey_after --cases heldout --max-tokens 4200 --policies keydiff compactor --peer-jobs 2",
          "passkey_heldout2": "benchmarks.passkey_after --cases heldout2 --max-tokens 4200 --policies compactor "
                              "--fractions 4 --peer-jobs 2",
          "passkey_heldout3": "benchmarks.passkey_after --cases heldout3 --max-tokens 4200 --policies compactor "
                              "--fractions 4 --peer-jobs 2"}
# (a suite is a module and, for a second configuration of a module, its arguments)
PEERS = {"decode": ("llamacpp",), "weights": ("llamacpp",), "long_chat": ("llamacpp",), "quality": ("llamacpp",),
         "load": ("llamacpp",), "kvpress": ("kvpress",),
         "passkey_after": ("kvpress",), "passkey_austen": ("kvpress",),
         "passkey_heldout": ("kvpress",), "passkey_heldout2": ("kvpress",),
         "passkey_heldout3": ("kvpress",)}  # the peer venvs each suite runs
BENCH_MODULES = ("matplotlib", "transformers", "accelerate", "optimum")  # the `bench` extra (optimum-quanto)


def setup(suites: list[str]) -> None:
    """Install the bench extra and the peers' venvs the chosen suites need (each once; failures are logged)."""
    if missing := [m for m in BENCH_MODULES if importlib.util.find_spec(m) is None]:
        common.log(f"installing the bench extra ({', '.join(missing)} missing)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{common.ROOT}[bench]"], check=False)
    peers = sorted({p for s in suites for p in PEERS.get(s, ()) if not common.venv_python(p).exists()})
    for peer in peers:
        common.log(f"setting up the {peer} venv (benchmarks/peers/setup.sh {peer}"
                   + ("; llama-cpp-python builds from source for minutes)" if peer == "llamacpp" else ")"))
        done = subprocess.run(["bash", str(common.ROOT / "benchmarks" / "peers" / "setup.sh"), peer], check=False)
        if done.returncode != 0:
            common.log(f"the {peer} venv could not be set up (exit {done.returncode}); its rows will be missing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller contexts and fewer tokens (minutes, not hours)")
    parser.add_argument("--no-setup", action="store_true", help="do not install the bench extra or the peers' venvs")
    parser.add_argument("suites", nargs="*", metavar="suite", help=f"any of {', '.join(SUITES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    suites = args.suites or list(SUITES)
    if not args.no_setup:
        setup(suites)
    failed = []
    for name in suites:
        common.log(f"== {name} ==")
        started = time.perf_counter()
        proc = common.run_python(sys.executable, ["-m", *SUITES[name].split(), *(["--quick"] if args.quick else [])])
        common.log(f"== {name}: exit {proc.returncode} after {time.perf_counter() - started:.0f} s ==")
        if proc.returncode != 0:
            failed.append(name)
    report.write()  # each section names the command that produced it
    if failed:
        common.log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
