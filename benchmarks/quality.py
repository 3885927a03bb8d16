"""What a bounded KV cache costs in quality, against the same run with the full cache.

1. Perplexity on the first N tokens of Pride and Prejudice, fed continuously (StreamingLLM-style), with KV
   budgets of N/2, N/4, N/8 tokens for every eviction policy, and with the full cache stored fp32/bf16/int8/int4.
2. Passkey retrieval (raw completion, greedy, 8 tokens) at budgets of 1/2 and 1/4 of the prompt per policy.

    python -m benchmarks.quality [--quick] [--tokens 4096] [--passkey-max-tokens 2500]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from benchmarks import common

SUITE = "quality"
POLICIES = ("window", "h2o", "snapkv", "tova")
FRACTIONS = (2, 4, 8)
PASSKEY_FRACTIONS = (2, 4)
STORAGE = ("fp32", "bf16", "int8", "int4")
RAW_CHUNK_NOTE = ("llm.generate(raw=True) prefills in the runner's default chunk (512) even when an evicting "
                  "cache holds fewer tokens, which raises KVBudgetExceeded; the suite sets runner.chunk to "
                  "min(512, capacity // 4), as Chat.send does, for the evicting passkey runs")


def load_llm():
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    import kvbound

    return kvbound.load(dtype="fp32", weights="fp32", device="cpu")  # dense fp32: the numbers session 1 measured


def perplexity_runs(llm, tokens: int, advance) -> list[dict[str, Any]]:
    from kvbound.config import CacheConfig
    from kvbound.engine.perplexity import perplexity

    text = common.data_file("texts/prideprejudice.txt").read_text()[: tokens * 8]
    runs: list[tuple[str, str, str, CacheConfig]] = [("full", "none", d, CacheConfig(dtype=d)) for d in STORAGE]
    for policy in POLICIES:
        for f in FRACTIONS:
            runs.append((f"1/{f}", policy, "fp32", CacheConfig(tokens=tokens // f, policy=policy)))
    rows = []
    for budget, policy, dtype, cfg in runs:
        r = perplexity(llm, text, cfg, max_tokens=tokens)
        rows.append({"budget": budget, "policy": policy, "kv_dtype": dtype,
                     "kv_tokens": cfg.tokens or r.capacity_tokens,
                     "ppl": r.ppl, "scored_tokens": r.tokens, "kv_peak_bytes": r.kv_peak_bytes,
                     "evicted_tokens": r.evicted_tokens, "chunk": r.chunk, "elapsed_s": r.elapsed_s})
        advance(note=f"ppl {budget} {policy} {dtype}: {r.ppl:.3f}")
    full = next(r["ppl"] for r in rows if r["budget"] == "full" and r["kv_dtype"] == "fp32")
    for r in rows:
        r["delta_ppl_pct"] = 100.0 * (r["ppl"] / full - 1.0)
    return rows


@contextmanager
def prefill_chunk(llm, chunk: int) -> Iterator[None]:
    saved = llm.runner.chunk
    llm.runner.chunk = chunk
    try:
        yield
    finally:
        llm.runner.chunk = saved


def passkey_cases(llm, max_tokens: int) -> list[dict[str, Any]]:
    cases = []
    for case in common.read_jsonl(common.data_file("passkey/dev-classic.jsonl")):
        n = len(llm.tokenizer.encode(case["prompt"], add_special=True))
        if n <= max_tokens:
            cases.append({**case, "prompt_tokens": n})
    return cases


def passkey_runs(llm, cases: list[dict[str, Any]], advance) -> list[dict[str, Any]]:
    from kvbound.config import CacheConfig

    rows = []
    for case in cases:
        n = case["prompt_tokens"]
        configs = [("full", "none", CacheConfig())]
        configs += [(f"1/{f}", p, CacheConfig(tokens=n // f, policy=p)) for p in POLICIES for f in PASSKEY_FRACTIONS]
        for budget, policy, cfg in configs:
            chunk = min(llm.runner.chunk, max(1, cfg.tokens // 4)) if cfg.tokens else llm.runner.chunk
            with prefill_chunk(llm, chunk):
                try:
                    reply = llm.generate(case["prompt"], raw=True, temperature=0, max_new_tokens=8, cache=cfg)
                    text, error = reply.text, None
                except Exception as exc:  # recorded, not fatal: one failing configuration must not end the suite
                    text, error = "", f"{type(exc).__name__}: {exc}"
            hit = str(case["answer"]) in text
            rows.append({"id": case["id"], "prompt_tokens": n, "depth": case["depth"], "budget": budget,
                         "policy": policy, "kv_tokens": cfg.tokens or n, "hit": hit, "text": text, "error": error})
            advance(note=f"passkey {case['id']} {budget} {policy}: {'hit' if hit else 'miss'}")
    return rows


def measure(tokens: int, passkey_max: int) -> dict[str, Any]:
    llm = load_llm()
    cases = passkey_cases(llm, passkey_max)
    total = len(STORAGE) + len(POLICIES) * len(FRACTIONS) + len(cases) * (1 + len(POLICIES) * len(PASSKEY_FRACTIONS))
    with common.progress(total, "quality") as advance:
        ppl = perplexity_runs(llm, tokens, advance)
        passkey = passkey_runs(llm, cases, advance)
    return {"config": {"ppl_tokens": tokens, "ppl_text": "data/texts/prideprejudice.txt (from the start)",
                       "ppl_chunk": 512, "policies": list(POLICIES), "fractions": list(FRACTIONS),
                       "passkey_file": "data/passkey/dev-classic.jsonl", "passkey_max_prompt_tokens": passkey_max,
                       "passkey_fractions": list(PASSKEY_FRACTIONS), "model_dtype": "fp32",
                       "workaround": RAW_CHUNK_NOTE},
            "perplexity": ppl, "passkey": passkey}


def passkey_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["policy"]), []).append(r)
    return [{"budget": b, "policy": p, "hits": sum(r["hit"] for r in rs), "cases": len(rs),
             "errors": sum(r["error"] is not None for r in rs)} for (b, p), rs in groups.items()]


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    ppl_rows = [[r["budget"], r["policy"], r["kv_dtype"], r["kv_tokens"], f"{r['ppl']:.3f}",
                 f"{r['delta_ppl_pct']:+.2f}%", common.mib(r["kv_peak_bytes"]), r["evicted_tokens"]]
                for r in result["perplexity"]]
    scored = result["perplexity"][0]["scored_tokens"] if result["perplexity"] else 0
    parts = [f"**Perplexity**, first {cfg['ppl_tokens']} tokens ({scored} scored), fed continuously in chunks of "
             f"at most {cfg['ppl_chunk']} (a quarter of the capacity under eviction), never reset.", "",
             common.markdown_table(["KV budget", "policy", "KV dtype", "KV tokens", "PPL", "ΔPPL vs full fp32",
                                    "KV peak MiB", "evicted"], ppl_rows), ""]
    pk = passkey_summary(result["passkey"])
    lengths = sorted({r["prompt_tokens"] for r in result["passkey"]})
    parts += [f"**Passkey retrieval** ({cfg['passkey_file']}, prompts of {', '.join(map(str, lengths))} tokens, "
              "raw completion, greedy 8 tokens; budget as a fraction of the prompt).", "",
              common.markdown_table(["KV budget", "policy", "hits", "errors"],
                                    [[s["budget"], s["policy"], f"{s['hits']}/{s['cases']}", s["errors"]] for s in pk]),
              "", f"Note: {cfg['workaround']}."]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1536 tokens of perplexity, passkey prompts <= 1000 tokens")
    parser.add_argument("--tokens", type=int, help="tokens of text for perplexity (N)")
    parser.add_argument("--passkey-max-tokens", type=int, help="longest passkey prompt used")
    args = parser.parse_args(argv)
    tokens = args.tokens or (1536 if args.quick else 4096)
    passkey_max = args.passkey_max_tokens or (1000 if args.quick else 2500)
    result = measure(tokens, passkey_max)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
