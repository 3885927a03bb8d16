"""Passkey retrieval with the question after compression: the context (filler with a 5-digit key hidden at depth
0.1 / 0.5 / 0.9) is prefilled into a KV cache of 1/4 or 1/8 of its tokens, evicting as it goes; only then does
"What is the pass key?" arrive, so a policy that scores tokens by the latest queries cannot know what to keep.
Greedy, 8 new tokens; a hit when the answer appears. The full cache is the ceiling. Default model, fp32 compute.

Each policy runs with recall off (the policy alone) and on (`generate(raw=True, recall="on")`: passages the cache
evicted are searched with the prompt's last sentences and come back before them; chat/passages.py).

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


def answer_with_recall(llm, case: dict[str, Any], tokens: int, policy: str) -> tuple[str, dict[str, Any]]:
    from kvbound.config import CacheConfig

    reply = llm.generate(case["prompt"], raw=True, cache=CacheConfig(tokens=tokens, policy=policy), recall="on",
                         max_new_tokens=8, temperature=0.0)
    return reply.text, reply.recall


def measure(max_tokens: int, policies: list[str]) -> dict[str, Any]:
    import kvbound

    common.pin_threads()
    llm = kvbound.load(dtype="fp32", tune_allocator=True)
    chosen = cases(llm, max_tokens)
    rows = []
    with common.progress(len(chosen) * (1 + 2 * len(policies) * len(FRACTIONS)), SUITE) as advance:
        for case in chosen:
            n = len(case["context"]) + len(case["question"])
            configs = [("full", "none", None, False)] + [
                (f"1/{f}", p, n // f, recall) for p in policies for f in FRACTIONS for recall in (False, True)]
            for budget, policy, tokens, recall in configs:
                recalled: dict[str, Any] = {}
                if recall:
                    text, recalled = answer_with_recall(llm, case, tokens, policy)
                else:
                    text = answer(llm, case, tokens, policy)
                hit = str(case["answer"]) in text
                rows.append({"id": case["id"], "prompt_tokens": n, "depth": case["depth"], "budget": budget,
                             "policy": policy, "recall": recall, "kv_tokens": tokens or n, "hit": hit, "text": text,
                             "recalled": recalled})
                advance(note=f"{case['id']} {budget} {policy}{' +recall' if recall else ''}: "
                             f"{'hit' if hit else 'miss'}")
    return {"rows": rows, "policies": policies, "fractions": list(FRACTIONS), "max_tokens": max_tokens,
            "cases": len(chosen), "model_dtype": "fp32"}


def _hits(rows: list[dict[str, Any]], policy: str, fraction: int, recall: bool) -> list[bool]:
    return [r["hit"] for r in rows if r["policy"] == policy and r["budget"] == f"1/{fraction}"
            and r.get("recall", False) == recall]


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    full = sum(r["hit"] for r in rows if r["budget"] == "full")
    recall = any(r.get("recall") for r in rows)
    header = ["policy"] + [f"KV 1/{f}{', recall ' + m if recall else ''}" for f in result["fractions"]
                           for m in (("off", "on") if recall else ("",))]
    table_rows = [["full cache"] + [f"{full}/{result['cases']}"] * (len(header) - 1)]
    for policy in result["policies"]:
        cells = []
        for f in result["fractions"]:
            for on in ((False, True) if recall else (False,)):
                hits = _hits(rows, policy, f, on)
                cells.append(f"{sum(hits)}/{len(hits)}")
        table_rows.append([policy] + cells)
    table = common.markdown_table(header, table_rows)
    return (f"{result['cases']} cases of `data/passkey/dev-classic.jsonl` up to {result['max_tokens']:,} tokens; "
            f"the question is fed after the context was compressed. Recall on: the prompt's evicted passages are "
            f"searched with its last sentences and the best come back before them, inside the same KV budget."
            f"\n\n{table}")


def headlines(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    full = sum(r["hit"] for r in rows if r["budget"] == "full")
    parts, recalled = [], []
    for policy in result["policies"]:
        hits = [sum(_hits(rows, policy, f, False)) for f in result["fractions"]]
        parts.append(f"{policy} {' / '.join(map(str, hits))}")
        on = [sum(_hits(rows, policy, f, True)) for f in result["fractions"]]
        if any(r.get("recall") for r in rows):
            recalled.append(f"{policy} {' / '.join(map(str, on))}")
    lines = [f"Passkey with the question after compression, KV at 1/4 / 1/8 of the prompt, {result['cases']} cases "
             f"(full cache {full}): " + ", ".join(parts) + "."]
    if recalled:
        lines.append("The same with recall on: " + ", ".join(recalled) + ".")
    return lines


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
