"""Passkey retrieval with the question after compression: the context (filler with a 5-digit key hidden at depth
0.1 / 0.5 / 0.9) is prefilled into a KV cache of 1/4 or 1/8 of its tokens, evicting as it goes; only then does
"What is the pass key?" arrive, so a policy that scores tokens by the latest queries cannot know what to keep.
Greedy, 8 new tokens; a hit when the answer appears. The full cache is the ceiling. Default model, fp32 compute.

    python -m benchmarks.passkey_after [--max-tokens 4000] [--policies window h2o snapkv tova keydiff]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks import common

SUITE = "passkey_after"
QUESTION = "What is the pass key?"
FRACTIONS = (4, 8)


def cases(llm, max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for case in common.read_jsonl(common.data_file("passkey/dev-classic.jsonl")):
        cut = case["prompt"].rindex(QUESTION)
        context = llm.tokenizer.encode(case["prompt"][:cut], add_special=True)
        question = llm.tokenizer.encode(case["prompt"][cut:])
        if len(context) + len(question) <= max_tokens:
            out.append({**case, "context": context, "question": question})
    return out


def answer(llm, case: dict[str, Any], tokens: int | None, policy: str) -> str:
    import torch
    from kvbound.config import CacheConfig
    from kvbound.engine.runner import prefill_chunk

    cache = llm.new_cache(CacheConfig(tokens=tokens, policy=policy) if tokens else CacheConfig())
    chunk = prefill_chunk(llm.runner.chunk, cache.capacity, cache.policy.evicts)  # what eviction can make room for
    try:
        llm.runner.prefill(case["context"], cache, chunk)  # compressed before the question exists
        logits = llm.runner.prefill(case["question"], cache, chunk)
        out = []
        for _ in range(8):
            token = int(torch.argmax(logits))
            out.append(token)
            logits = llm.runner.decode(token, cache)
        return llm.tokenizer.decode(out)
    finally:
        cache.free()


def measure(max_tokens: int, policies: list[str]) -> dict[str, Any]:
    import kvbound

    common.pin_threads()
    llm = kvbound.load(dtype="fp32", tune_allocator=True)
    chosen = cases(llm, max_tokens)
    rows = []
    with common.progress(len(chosen) * (1 + len(policies) * len(FRACTIONS)), SUITE) as advance:
        for case in chosen:
            n = len(case["context"]) + len(case["question"])
            configs = [("full", "none", None)] + [(f"1/{f}", p, n // f) for p in policies for f in FRACTIONS]
            for budget, policy, tokens in configs:
                text = answer(llm, case, tokens, policy)
                hit = str(case["answer"]) in text
                rows.append({"id": case["id"], "prompt_tokens": n, "depth": case["depth"], "budget": budget,
                             "policy": policy, "kv_tokens": tokens or n, "hit": hit, "text": text})
                advance(note=f"{case['id']} {budget} {policy}: {'hit' if hit else 'miss'}")
    return {"rows": rows, "policies": policies, "fractions": list(FRACTIONS), "max_tokens": max_tokens,
            "cases": len(chosen), "model_dtype": "fp32"}


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    full = sum(r["hit"] for r in rows if r["budget"] == "full")
    table_rows = [["full cache", "–", f"{full}/{result['cases']}"]]
    for policy in result["policies"]:
        for f in result["fractions"]:
            mine = [r for r in rows if r["policy"] == policy and r["budget"] == f"1/{f}"]
            table_rows.append([policy, f"1/{f}", f"{sum(r['hit'] for r in mine)}/{len(mine)}"])
    table = common.markdown_table(["policy", "KV of the prompt", "passkeys found"], table_rows)
    return (f"{result['cases']} cases of `data/passkey/dev-classic.jsonl` up to {result['max_tokens']:,} tokens; "
            f"the question is fed after the context was compressed.\n\n{table}")


def headlines(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    full = sum(r["hit"] for r in rows if r["budget"] == "full")
    parts = []
    for policy in result["policies"]:
        hits = [sum(r["hit"] for r in rows if r["policy"] == policy and r["budget"] == f"1/{f}")
                for f in result["fractions"]]
        parts.append(f"{policy} {' / '.join(map(str, hits))}")
    return [f"Passkey with the question after compression, KV at 1/4 / 1/8 of the prompt, {result['cases']} cases "
            f"(full cache {full}): " + ", ".join(parts) + "."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="prompts up to 2,000 tokens")
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--policies", nargs="+", default=["window", "h2o", "snapkv", "tova", "keydiff"])
    args = parser.parse_args(argv)
    result = measure(2000 if args.quick else args.max_tokens, args.policies)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
