"""Continuous batching: decode tokens/s of B concurrent sequences, one batched forward per token for all of them
(`Runner.decode_batch`, what the server's worker runs) against one forward per sequence per token (a round-robin
worker), on the real default model, CPU, one thread.

The sequences sit in one shared KV pool, as the server's sessions do, with prompts of different lengths from the
same book. Two levels are timed: the bare forwards with greedy argmax, and whole generations (sampler,
detokenizer: engine.generate.Decoder) driven as the worker drives them — one step of each alone per round
without batching, or one `engine.batch.step` over all of them per round. The two systems run side by
side on two sets of caches and alternate every token (every round for generations), so a machine shared with
other work slows both alike; the figures are totals over the repeats.

    python -m benchmarks.batch_decode [--quick] [--sizes 1 2 4 8] [--tokens 32] [--context 256] [--repeats 2]
                                      [--weights auto fp32]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from benchmarks import common

SUITE = "batch_decode"
POOL_BUDGET = "256MiB"  # room for 8 sequences of ~700 tokens even with fp32 KV


def prompts(llm, count: int, context: int) -> list[list[int]]:
    """`count` prompts of different lengths (context, context + 24, ...) from different places of one book."""
    text = common.data_file("texts/prideprejudice.txt").read_text()
    out = []
    for i in range(count):
        piece = text[20_000 * (i + 1):20_000 * (i + 1) + (context + 24 * count) * 8]
        out.append(llm.tokenizer.encode(piece)[: context + 24 * i])
    return out


def prefilled(llm, ids: list[list[int]]) -> tuple[list, list[int]]:
    """Caches in one fresh shared pool holding `ids`, and each sequence's greedy next token."""
    from kvbound.config import CacheConfig

    pool = llm.shared_pool(POOL_BUDGET)
    caches = [llm.new_cache(CacheConfig(), pool=pool) for _ in ids]
    return caches, [int(llm.runner.prefill(p, cache).argmax()) for p, cache in zip(ids, caches)]


def step_sequential(llm, caches, out: list[list[int]]) -> None:
    for seq, cache in zip(out, caches):
        seq.append(int(llm.runner.decode(seq[-1], cache).argmax()))


def step_batched(llm, caches, out: list[list[int]]) -> None:
    logits = llm.runner.decode_batch([seq[-1] for seq in out], caches)  # (B, V)
    for seq, token in zip(out, logits.argmax(-1).tolist()):
        seq.append(token)


def forwards(llm, ids, tokens: int) -> dict[str, Any]:
    """Both systems, alternating every token: seconds and greedy tokens of each."""
    systems = {"sequential": step_sequential, "batched": step_batched}
    state = {name: prefilled(llm, ids) for name in systems}
    out = {name: [[t] for t in state[name][1]] for name in systems}
    seconds = dict.fromkeys(systems, 0.0)
    for step in range(tokens):
        for name in (list(systems) if step % 2 == 0 else list(systems)[::-1]):
            started = time.perf_counter()
            systems[name](llm, state[name][0], out[name])
            seconds[name] += time.perf_counter() - started
    for caches, _ in state.values():
        for cache in caches:
            cache.free()
    return {"seconds": seconds, "tokens": out}


def generations(llm, ids, tokens: int) -> dict[str, Any]:
    """Whole generations (engine.generate.Decoder), a round-robin round (one step of each alone) and a batched
    round (engine.batch.step over all of them) alternating round by round: seconds and tokens of each."""
    from kvbound.engine import batch
    from kvbound.engine.generate import Decoder
    from kvbound.engine.sampler import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0.0,
                            logit_bias={i: -100.0 for i in llm.tokenizer.stop_ids})  # every run decodes `tokens`
    runs: dict[str, list[Decoder]] = {}
    caches_of: dict[str, list] = {}
    for name in ("sequential", "batched"):
        caches, _ = prefilled(llm, [p[:-1] for p in ids])
        caches_of[name] = caches
        runs[name] = [Decoder(llm.runner, llm.tokenizer, cache, llm.runner.prefill(prompt[-1:], cache), params, prompt)
                      for prompt, cache in zip(ids, caches)]

    def round_robin() -> bool:
        live = [d for d in runs["sequential"] if not d.done]
        for decoder in live:
            decoder.step()
        return any(not d.done for d in runs["sequential"])

    def batched() -> bool:
        live = [d for d in runs["batched"] if not d.done]
        if live:
            batch.step(live)
        return any(not d.done for d in runs["batched"])

    systems: dict[str, Callable[[], bool]] = {"sequential": round_robin, "batched": batched}
    seconds, running = dict.fromkeys(systems, 0.0), set(systems)
    turn = 0
    while running:
        for name in (list(systems) if turn % 2 == 0 else list(systems)[::-1]):
            if name in running:
                started = time.perf_counter()
                if not systems[name]():
                    running.discard(name)
                seconds[name] += time.perf_counter() - started
        turn += 1
    for caches in caches_of.values():
        for cache in caches:
            cache.free()
    return {"seconds": seconds, "tokens": {name: [d.result.token_ids for d in runs[name]] for name in runs}}


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Sequences whose greedy tokens are identical, and the shortest common prefix."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = min(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in zip(a, b))
    return f"{same}/{len(a)} identical, first {prefix} tokens equal in all"


def measure(sizes: list[int], tokens: int, context: int, repeats: int, weights: list[str]) -> dict[str, Any]:
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    import kvbound

    rows = []
    with common.progress(len(weights) * len(sizes) * repeats, SUITE) as advance:
        for mode in weights:
            llm = kvbound.load(weights=mode, device="cpu")
            all_ids = prompts(llm, max(sizes), context)
            for B in sizes:
                ids = all_ids[:B]
                forwards(llm, ids, 4)  # warm-up: first-call allocations, kernels for B rows
                totals = {level: dict.fromkeys(("sequential", "batched"), 0.0) for level in ("forwards", "generations")}
                outputs: dict[str, Any] = {}
                for _ in range(repeats):
                    for level, run in (("forwards", forwards), ("generations", generations)):
                        r = run(llm, ids, tokens)
                        for name, s in r["seconds"].items():
                            totals[level][name] += s
                        outputs[level] = r["tokens"]
                    advance(note=f"{mode} B={B}: batched {totals['forwards']['sequential'] / totals['forwards']['batched']:.2f}x")
                for level, seconds in totals.items():
                    decoded = repeats * B * tokens
                    rows.append({
                        "weights": mode, "storage": llm.info().weights_storage, "compute_dtype": llm.dtype_name,
                        "level": level, "sequences": B, "tokens_per_sequence": tokens,
                        "prompt_tokens": [len(p) for p in ids],
                        "sequential_tok_s": decoded / seconds["sequential"],
                        "batched_tok_s": decoded / seconds["batched"],
                        "speedup": seconds["sequential"] / seconds["batched"],
                        "greedy_agreement": agreement(outputs[level]["sequential"], outputs[level]["batched"])})
            del llm
    return {"config": {"sizes": sizes, "tokens_per_sequence": tokens, "context": context, "repeats": repeats,
                       "weights": weights, "model": "kvbound.load() default (smollm2-135m)", "device": "cpu",
                       "kv": f"one shared pool ({POOL_BUDGET}, KV in the compute dtype), blocks of 32",
                       "timing": "the two systems alternate every token (generations: every round); "
                                 "totals over the repeats"},
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    rows = [[r["weights"], r["compute_dtype"], r["level"], r["sequences"], round(r["sequential_tok_s"], 1),
             round(r["batched_tok_s"], 1), f"{r['speedup']:.2f}x", r["greedy_agreement"]] for r in result["rows"]]
    table = common.markdown_table(["weights", "compute", "level", "sequences", "sequential tok/s (all sequences)",
                                   "batched tok/s", "batched / sequential", "greedy tokens"], rows)
    cfg = result["config"]
    head = (f"{cfg['tokens_per_sequence']} greedy tokens per sequence after prompts of {cfg['context']}+ tokens, "
            f"sequences in {cfg['kv']}; {cfg['timing']}.")
    return "\n".join([head, "", table])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1 2 4, 16 tokens, one repeat")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--tokens", type=int, help="greedy tokens decoded per sequence")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens of the first sequence")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--weights", nargs="+", default=["auto"], help="load(weights=...) modes to measure")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1, 2, 4] if args.quick else [1, 2, 4, 8])
    tokens = args.tokens or (16 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 2)
    result = measure(sizes, tokens, args.context, repeats, args.weights)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
