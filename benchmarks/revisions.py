"""Decode speed of two revisions of kvbound in one run: does a change slow the default path down?

Each revision runs in its own process (its source tree on PYTHONPATH, a git worktree for the base), loads the
default model once, then answers measurements in turn, the two alternating, so a busy machine slows both alike.
Two levels: the bare step (`runner.prefill` + `runner.decode` with argmax) and a whole chat turn (`Chat.send`,
greedy: sampler, detokenizer, receipts), each after N tokens of context. Reported: median tok/s and the ratio
head / base.

    python -m benchmarks.revisions [--base REV] [--contexts 512 2048 8000] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

SUITE = "revisions"
ROOT = Path(__file__).resolve().parents[1]
DECODE_TOKENS = 64

CHILD = r"""
import json, sys, time
import torch
import kvbound
from kvbound.config import CacheConfig

torch.set_num_threads(int(sys.argv[1]))
llm = kvbound.load()
book = open(sys.argv[2], encoding="utf-8").read()
ids = llm.tokenizer.encode(book)
print(json.dumps({"ready": kvbound.__file__}), flush=True)
for line in sys.stdin:
    level, n = line.split()
    n = int(n)
    if level == "step":
        cache = llm.new_cache(CacheConfig(tokens=n + %(tokens)d + 1))
        token = int(torch.argmax(llm.runner.prefill(ids[:n], cache)))
        t0 = time.perf_counter()
        for _ in range(%(tokens)d):
            token = int(torch.argmax(llm.runner.decode(token, cache)))
        rate = %(tokens)d / (time.perf_counter() - t0)
        cache.free()
    else:
        chat = llm.chat(tokens=n + 2 * %(tokens)d)
        text = llm.tokenizer.decode(ids[:n - 32])
        bias = {i: -100.0 for i in llm.tokenizer.stop_ids}
        rate = chat.send(text, max_new_tokens=%(tokens)d, temperature=0.0, logit_bias=bias).decode_tokens_per_s
        chat.close()
    print(json.dumps({"rate": rate}), flush=True)
""" % {"tokens": DECODE_TOKENS}


class Revision:
    def __init__(self, name: str, src: Path, threads: int, book: Path):
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(book)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.origin = json.loads(self.proc.stdout.readline())["ready"]

    def measure(self, level: str, n: int) -> float:
        self.proc.stdin.write(f"{level} {n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["rate"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def markdown(result: dict[str, Any]) -> str:
    rows = [[r["level"], f"{r['context']:,}", f"{r['base_tok_s']:.1f}", f"{r['head_tok_s']:.1f}", f"{r['ratio']:.2f}x"]
            for r in result["rows"]]
    table = common.markdown_table(["level", "tokens of context", "base tok/s", "head tok/s", "head / base"], rows)
    return (f"base `{result['base'][:10]}`, head `{result['head'][:10]}`, {result['threads']} thread(s), "
            f"{result['decode_tokens']} greedy tokens, median of {result['repeats']} interleaved runs. `step`: "
            "runner.prefill + runner.decode with argmax; `chat`: Chat.send (sampler, detokenizer, receipts).\n\n"
            + table)


def headlines(result: dict[str, Any]) -> list[str]:
    ratios = [r["ratio"] for r in result["rows"]]
    return [f"Decode of `{result['head'][:10]}` against `{result['base'][:10]}` (same run, interleaved): "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x over {len(ratios)} measurements (512 to "
            f"{max(r['context'] for r in result['rows']):,} tokens, bare step and whole chat turn)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="git revision to compare against (default: the previous "
                                                           "commit)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8000])  # 8000 + decode < 8192
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="512 and 2,048 tokens, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.repeats = [512, 2048], 1
    common.pin_threads(args.threads)
    book = common.data_file("texts/prideprejudice.txt")
    base_sha = subprocess.check_output(["git", "rev-parse", args.base], cwd=ROOT, text=True).strip()
    head_sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "src"], cwd=ROOT, text=True).strip())
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "base"
        subprocess.check_call(["git", "worktree", "add", "--detach", str(worktree), base_sha], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            revs = [Revision("base", worktree / "src", args.threads, book),
                    Revision("head", ROOT / "src", args.threads, book)]
            rates: dict[str, dict[str, list[float]]] = {}
            for repeat in range(args.repeats):
                for level in ("step", "chat"):
                    for n in args.contexts:
                        order = revs if repeat % 2 == 0 else revs[::-1]
                        for rev in order:
                            rates.setdefault(f"{level} {n}", {}).setdefault(rev.name, []).append(rev.measure(level, n))
            for rev in revs:
                rev.close()
        finally:
            subprocess.call(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)
    rows = []
    for key, by_rev in rates.items():
        base, head = statistics.median(by_rev["base"]), statistics.median(by_rev["head"])
        rows.append({"level": key.split()[0], "context": int(key.split()[1]), "base_tok_s": round(base, 2),
                     "head_tok_s": round(head, 2), "ratio": round(head / base, 3), "samples": by_rev})
        print(f"{key:>12}: base {base:7.1f} tok/s   head {head:7.1f} tok/s   head/base {head / base:.3f}")
    result = {"suite": SUITE, "base": base_sha, "head": head_sha + (" (with uncommitted changes)" if dirty else ""),
              "threads": args.threads, "decode_tokens": DECODE_TOKENS, "repeats": args.repeats, "rows": rows,
              "command": common.command_line(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    common.write_result(SUITE, result, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
