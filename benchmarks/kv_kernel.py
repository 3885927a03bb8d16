"""Attention alone, per decode step: every KV storage type through the native kernel (blocks read in place through
the block table) and through the eager path it replaces (float KV: SDPA over the layer; int8/int4: dequantize the
layer into a float scratch, then SDPA), with the KV bytes read per second against this machine's copy bandwidth.

The cache has the default model's shape (30 layers, 3 KV heads of 64, 9 query heads) and is filled with random
K/V to the context through the cache's own write path; then single-token steps are timed through every layer
(`PagedCache.attend`: the write of the new token included). One process, kvbound's default compute dtype (bf16).

    python -m benchmarks.kv_kernel [--quick] [--contexts 512 2048 8192] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from benchmarks import common

SUITE = "kv_kernel"
SYSTEMS = (("bf16", "eager"), ("bf16", "native"), ("fp16", "native"), ("fp32", "eager"), ("fp32", "native"),
           ("int8", "eager"), ("int8", "native"), ("int4", "eager"), ("int4", "native"))
CHUNK = 512


@contextmanager
def native_path(on: bool) -> Iterator[None]:
    from kvbound.kvcache import native

    saved = native.library
    if not on:
        native.library = lambda: None
    try:
        yield
    finally:
        native.library = saved


def step(cache, tokens: int, heads: int, gen, dtype) -> float:
    """Feed `tokens` random tokens (`heads` query heads) through every layer; seconds spent in attend()."""
    import torch

    spec = cache.spec
    cache.begin(tokens)
    spent = 0.0
    for layer in range(spec.num_layers):
        q = torch.randn(1, heads, tokens, spec.head_dim, generator=gen).to(dtype)
        k, v = (torch.randn(2, 1, spec.num_kv_heads, tokens, spec.head_dim, generator=gen) * 2).to(dtype)
        t0 = time.perf_counter()
        cache.attend(layer, q, k, v)
        spent += time.perf_counter() - t0
    cache.end()
    return spent


def measure(contexts: list[int], steps: int, repeats: int, threads: list[int]) -> dict[str, Any]:
    common.pin_threads(max(threads))
    import torch

    import kvbound
    from kvbound.config import CacheConfig
    from kvbound.kvcache import native

    from benchmarks.weights import copy_bandwidth

    bandwidth = copy_bandwidth()
    llm = kvbound.load(device="cpu")
    heads = llm.config.num_heads
    rows = []
    with common.progress(len(threads) * len(contexts) * len(SYSTEMS), SUITE) as advance:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for context in contexts:
                held = min(context, llm.config.max_context - steps * repeats - 8)  # the steps must fit the model
                base = None
                for dtype, path in SYSTEMS:
                    gen = torch.Generator().manual_seed(context)
                    cache = llm.new_cache(CacheConfig(tokens=held + steps * repeats + 8, dtype=dtype))
                    with torch.inference_mode(), native_path(path != "eager"):
                        for start in range(0, held, CHUNK):
                            step(cache, min(CHUNK, held - start), heads, gen, llm.model.dtype)
                        step(cache, 1, heads, gen, llm.model.dtype)  # warm-up
                        times = [sum(step(cache, 1, heads, gen, llm.model.dtype) for _ in range(steps)) / steps
                                 for _ in range(repeats)]
                    row = {"kv_dtype": dtype, "path": path, "threads": n_threads, "context": context, "held": held,
                           "ms_per_step": 1e3 * min(times), "kv_bytes": cache.nbytes}
                    row["kv_read_bytes_per_s"] = row["kv_bytes"] / min(times)  # every held byte is read once a step
                    base = base or row["ms_per_step"]
                    row["vs_bf16_sdpa"] = base / row["ms_per_step"]
                    rows.append(row)
                    cache.free()
                    advance(note=f"{n_threads} thr {context} {dtype} {path}: {row['ms_per_step']:.1f} ms")
    return {"config": {"contexts": contexts, "steps": steps, "repeats": repeats, "threads": threads,
                       "layers": llm.config.num_layers, "kv_heads": llm.config.num_kv_heads,
                       "query_heads": llm.config.num_heads, "head_dim": llm.config.head_dim,
                       "compute_dtype": llm.dtype_name, "native_kernel": native.available(),
                       "copy_bandwidth_bytes_per_s": bandwidth,
                       "timing": "attend() of every layer for one token, mean over steps, best of repeats"},
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    read_rate = cfg.get("copy_bandwidth_bytes_per_s", 0) / 2  # a copy reads half the bytes it moves

    def kv_rate(r: dict[str, Any]) -> str:
        if "kv_read_bytes_per_s" not in r:
            return "—"
        share = f" ({100 * r['kv_read_bytes_per_s'] / read_rate:.0f}%)" if read_rate else ""
        return f"{r['kv_read_bytes_per_s'] / 1e9:.1f}{share}"

    rows = [[r["threads"], r["context"], f"{r['kv_dtype']} {r['path']}", round(r["ms_per_step"], 2),
             f"{r['vs_bf16_sdpa']:.2f}x", common.mib(r["kv_bytes"]), kv_rate(r)] for r in result["rows"]]
    head = (f"Attention of one decode step through all {cfg['layers']} layers ({cfg['query_heads']} query heads, "
            f"{cfg['kv_heads']} KV heads of {cfg['head_dim']}; random K/V written through the cache; computing in "
            f"{cfg['compute_dtype']}); {cfg['timing']}. `eager` runs SDPA over the layer's K/V (int8/int4: dequantized "
            "into a scratch first); `native` is kernels/qattn.c, reading the blocks in place. Speed is relative to bf16 "
            "KV through SDPA at the same context and threads. KV GB/s: the KV bytes held, all read once a step, per "
            "second"
            + (f"; in brackets against the rate at which one thread of this machine reads while copying "
               f"({cfg['copy_bandwidth_bytes_per_s'] / 2e9:.1f} GB/s)." if "copy_bandwidth_bytes_per_s" in cfg else "."))
    table = common.markdown_table(["threads", "context", "KV / path", "ms per step", "speed vs bf16 SDPA", "KV MiB",
                                   "KV GB/s"], rows)
    return "\n".join([head, "", table])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_kernel", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 512 and 2048, one thread")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--threads", type=int, nargs="+")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    contexts = args.contexts or ([512, 2048] if args.quick else [512, 2048, 8192])
    threads = args.threads or ([1] if args.quick else [1, 2])
    result = measure(contexts, args.steps, args.repeats, threads)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
