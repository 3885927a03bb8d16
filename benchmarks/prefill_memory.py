"""Prefill memory: the extra peak RSS of prefilling a long prompt, and how much of it is not the KV cache itself.

kvbound prefills in chunks of 512 tokens; transformers (the same GGUF dequantized to fp32, DynamicCache) runs the
prompt in one forward, as `model(input_ids)` does. The project's goal: kvbound's chunked prefill needs at most 64 MiB
(the stated "64 MB", read as MiB like every size here) of peak beyond the KV it keeps.

Every system runs in its own fresh process, one thread: load, a 64-token warm-up prefill in a throwaway cache,
gc, then RSS is read, the kernel's high-water mark reset (/proc/self/clear_refs), the cache created and the prompt
prefilled; the peak is VmHWM afterwards (ru_maxrss would also carry the parent's peak from before exec).

    python -m benchmarks.prefill_memory [--quick] [--contexts 2048 8192]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks import common

SUITE = "prefill_memory"
GOAL_BYTES = 64 * 2**20
WARMUP_TOKENS = 64
SYSTEMS = {  # child name: the system as reported
    "kvbound-auto": "kvbound chunked (default weights)",
    "kvbound-fp32": "kvbound chunked fp32",
    "hf": "transformers one-shot",
    "hf-last": "transformers one-shot, last logits only",
}


def kvbound_prefill(fp32: bool) -> tuple[Callable[[list[int]], int], dict[str, Any]]:
    import kvbound
    from kvbound.config import CacheConfig

    llm = kvbound.load(device="cpu", tune_allocator=True,  # the allocator the CLI's process runs with
                       **({"weights": "fp32", "dtype": "fp32"} if fp32 else {}))

    def prefill(ids: list[int]) -> int:
        cache = llm.new_cache(CacheConfig(tokens=len(ids) + 8, dtype="auto"))
        llm.runner.prefill(ids, cache)
        return cache.nbytes

    return prefill, {"compute_dtype": llm.dtype_name, "kv_dtype": llm.kv_spec.dtype, "chunk": llm.runner.chunk}


def transformers_prefill(last_only: bool) -> tuple[Callable[[list[int]], int], dict[str, Any]]:
    import inspect

    import torch
    import transformers

    from benchmarks.decode import hf_cache_bytes, load_transformers
    from kvbound.loading import resolve_model

    model = load_transformers(resolve_model())
    extra = {"logits_to_keep": 1} if last_only else {}
    if last_only and "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise LookupError(f"transformers {transformers.__version__}: {type(model).__name__}.forward has no "
                          "logits_to_keep")
    cache_kwarg = common.hf_cache_kwarg(model)

    def prefill(ids: list[int]) -> int:
        cache = transformers.DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg: cache}, **extra)
        return hf_cache_bytes(cache)

    return prefill, {"compute_dtype": "fp32", "kv_dtype": "fp32", "chunk": None}


def child(name: str, ids_file: str, out: str) -> int:
    """One system in this fresh process: warm up, reset the high-water mark, prefill the ids, report JSON."""
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    ids = json.loads(Path(ids_file).read_text())
    try:
        prefill, facts = kvbound_prefill(name == "kvbound-fp32") if name.startswith("kvbound") else \
            transformers_prefill(name == "hf-last")
    except LookupError as e:
        Path(out).write_text(json.dumps({"unavailable": str(e)}))
        return 0
    prefill(ids[:WARMUP_TOKENS])  # first-call allocations and kernel selection; the cache is dropped
    gc.collect()
    rss_before = common.rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    with common.stopwatch() as t:
        kv_bytes = prefill(ids)
    peak = common.peak_rss_bytes()
    Path(out).write_text(json.dumps({**facts, "prompt_tokens": len(ids), "rss_before_bytes": rss_before,
                                     "peak_rss_bytes": peak, "kv_bytes": kv_bytes, "prefill_s": t["s"]}))
    return 0


def run_child(name: str, ids: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        ids_file.write_text(json.dumps(ids))
        proc = common.run_python(sys.executable, ["-m", "benchmarks.prefill_memory", "--child", name,
                                                  "--ids", str(ids_file), "--out", str(out)])
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{SYSTEMS[name]} exited with status {proc.returncode}")
        return json.loads(out.read_text())


def measure(contexts: list[int]) -> dict[str, Any]:
    from benchmarks.decode import prompt_ids
    from kvbound.loading import open_checkpoint

    checkpoint = open_checkpoint(None)
    max_prompt = checkpoint.config.max_context - 8  # the cache holds the prompt plus a few tokens
    all_ids = prompt_ids(SimpleNamespace(tokenizer=checkpoint.make_tokenizer()), min(max(contexts), max_prompt))
    rows, unavailable = [], {}
    with common.progress(len(contexts) * len(SYSTEMS), SUITE) as advance:
        for context in contexts:
            ids = all_ids[: min(context, max_prompt)]
            for name, system in SYSTEMS.items():
                r = run_child(name, ids)
                if "unavailable" in r:
                    unavailable[system] = r["unavailable"]
                    advance(note=f"{system}: unavailable")
                    continue
                r["extra_peak_bytes"] = r["peak_rss_bytes"] - r["rss_before_bytes"]
                r["overhead_bytes"] = r["extra_peak_bytes"] - r["kv_bytes"]
                rows.append({"system": system, "context": context, **r})
                advance(note=f"{context} {system}: +{common.mib(r['extra_peak_bytes']):,.0f} MiB")
    return {"config": {"contexts": contexts, "model": str(checkpoint.path), "goal_bytes": GOAL_BYTES,
                       "warmup_tokens": WARMUP_TOKENS,
                       "method": "one fresh process per system and context, one run; peak = VmHWM after a reset "
                                 "just before the cache is created"},
            "rows": rows, "unavailable": unavailable}


def findings(result: dict[str, Any]) -> list[str]:
    """Per prompt: kvbound against the goal, then each transformers system against kvbound fp32 (the same weights
    and KV dtype, so the difference is the prefill itself)."""
    goal, lines = result["config"]["goal_bytes"], []
    for context in result["config"]["contexts"]:
        at = {r["system"]: r for r in result["rows"] if r["context"] == context}
        ours = [r for name, r in at.items() if name.startswith("kvbound")]
        if ours:
            missed = [r["system"] for r in ours if r["overhead_bytes"] > goal]
            lines.append(f"{ours[0]['prompt_tokens']:,}-token prompt, peak beyond the KV kept: "
                         + " and ".join(f"{r['system']} {common.mib(r['overhead_bytes']):,.0f} MiB" for r in ours)
                         + f" — goal ≤ {common.mib(goal):.0f} MiB " + (f"missed by {', '.join(missed)}." if missed
                                                                        else "met."))
        ref = at.get(SYSTEMS["kvbound-fp32"])
        for name, r in at.items():
            if ref is None or not name.startswith("transformers"):
                continue
            a, b = r["extra_peak_bytes"], ref["extra_peak_bytes"]
            winner = f"kvbound needs {a / b:.1f}x less" if a > b else f"transformers needs {b / a:.1f}x less"
            lines.append(f"{name} against kvbound chunked fp32 (both fp32 weights and KV): extra peak "
                         f"{common.mib(a):,.0f} vs {common.mib(b):,.0f} MiB, beyond KV "
                         f"{common.mib(r['overhead_bytes']):,.0f} vs {common.mib(ref['overhead_bytes']):,.0f} MiB "
                         f"— {winner} ({common.mib(abs(a - b)):,.0f} MiB).")
    return lines


def markdown(result: dict[str, Any]) -> str:
    goal = result["config"]["goal_bytes"]
    rows = [[r["system"], f"{r['prompt_tokens']:,}", common.mib(r["rss_before_bytes"]),
             common.mib(r["extra_peak_bytes"]), f"{common.mib(r['kv_bytes'])} ({r['kv_dtype']})",
             common.mib(r["overhead_bytes"]), round(r["prefill_s"], 1),
             "yes" if r["overhead_bytes"] <= goal else "no"] for r in result["rows"]]
    table = common.markdown_table(["system", "prompt tokens", "RSS before MiB", "peak extra MiB", "KV MiB (dtype)",
                                   "overhead beyond KV MiB", "prefill s", f"≤ {common.mib(goal):.0f} MiB beyond KV?"],
                                  rows)
    head = ("Extra peak RSS of one prefill over the process's RSS just before it (model loaded, warmed up): "
            "the KV the prefill leaves plus everything it needed on the way (activations, attention scores, "
            "logits). kvbound prefills in chunks of 512 tokens; transformers runs one forward over the whole "
            "prompt under torch.inference_mode(), the full variant returning logits for every position as "
            f"`model(input_ids)` does. Method: {result['config']['method']}; prefill seconds are one run on a shared "
            "machine, indicative only.")
    notes = [f"- {line}" for line in findings(result)]
    notes += [f"- {name}: dropped, {why}" for name, why in result.get("unavailable", {}).items()]
    return "\n".join([head, "", table, *([""] + notes if notes else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefill_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2048-token prompt")
    parser.add_argument("--contexts", type=int, nargs="+", help="prompt lengths (capped at the model's context - 8)")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.ids, args.out)
    common.pin_threads()
    contexts = args.contexts or ([2048] if args.quick else [8192])
    return common.finish(SUITE, measure(contexts), args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
