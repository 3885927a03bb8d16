"""Where a kvbound decode step spends its time (torch.profiler, one thread): the top operators, and how much of
the wall time no operator accounts for (Python and dispatch overhead). The native whole-model step shows as a few
operators around one call; --eager profiles the PyTorch step it replaces.

    python -m benchmarks.profile_decode [--context 2048] [--tokens 16] [--kv auto] [--weights auto] [--eager]
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--kv", default="auto", help="KV storage: auto (the compute dtype), fp32, bf16, int8, int4")
    parser.add_argument("--weights", default="auto", help="weights storage: auto, fp32, bf16, fp16, int8, int4")
    parser.add_argument("--policy", default="none")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--eager", action="store_true", help="the eager PyTorch step, not the native one")
    args = parser.parse_args(argv)
    common.pin_threads()
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(common.THREADS)
    import kvbound
    from kvbound.config import CacheConfig

    from benchmarks.decode import prompt_ids

    llm = kvbound.load(weights=args.weights, device="cpu")
    llm.model.native_decode = not args.eager
    ids = prompt_ids(llm, args.context)
    tokens = args.context + args.tokens + 8  # + the warm-up steps
    cache = llm.new_cache(CacheConfig(dtype=args.kv, tokens=tokens, policy=args.policy))
    token = int(torch.argmax(llm.runner.prefill(ids, cache)))
    for _ in range(4):  # warm-up
        token = int(torch.argmax(llm.runner.decode(token, cache)))
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.tokens):
            token = int(torch.argmax(llm.runner.decode(token, cache)))
    wall = time.perf_counter() - t
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"kvbound decode, context {args.context}, KV {args.kv}, weights {args.weights}, policy {args.policy}, "
          f"{'eager' if args.eager else 'native where covered'}, 1 thread: {args.tokens / wall:.2f} tok/s under the profiler; operators account for "
          f"{100 * self_total / wall:.0f}% of the wall time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
