"""Weight storage modes: bytes in memory, whole-process peak RSS and decode speed of kvbound per `--weights` mode
against transformers (the same GGUF dequantized to fp32, DynamicCache) and llama.cpp (the same GGUF, f16 KV).

Every system runs in its own fresh process (so peak RSS is its own), one thread, greedy decoding after a prefill of
the context; systems alternate per context and repeat; the best decode time of the repeats is reported.

    python -m benchmarks.weights [--quick] [--contexts 512 8192] [--tokens 32] [--repeats 2] [--compiled]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks import common

SUITE = "weights"
MODES = ("fp32", "bf16", "auto", "int8", "int4")
PEER = "llama.cpp KV f16"
# The process RSS at each phase of a run: the runtime imported, the model loaded, the end; and the peak.
PHASES = ("rss_start_bytes", "rss_loaded_bytes", "rss_end_bytes", "peak_rss_bytes")
BASELINE = "transformers DynamicCache fp32"


def child(args: argparse.Namespace) -> int:
    """One system, one context, in this process: prefill the ids, decode greedily, report JSON."""
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    ids = json.loads(Path(args.ids).read_text())
    if args.system == "transformers":
        from benchmarks.decode import TransformersSystem, load_transformers
        import transformers
    else:
        import kvbound
        from benchmarks.decode import KvboundSystem
    rss_start = common.rss_bytes()  # the runtime, imported: what every model pays before its weights
    started = time.perf_counter()
    if args.system == "transformers":

        from kvbound.loading import resolve_model

        hf = load_transformers(resolve_model())
        weights = sum(p.nbytes for p in hf.parameters())
        system = TransformersSystem(hf, "DynamicCache", lambda n: transformers.DynamicCache(config=hf.config))
    else:
        mode, _, compiled = args.system.partition("+")  # "auto+compile": the compiled decode step
        llm = kvbound.load(weights=mode, device="cpu", compile=bool(compiled), tune_allocator=True)  # as the CLI
        weights = llm.model.weights_bytes()
        system = KvboundSystem(llm, "auto")
    load_s = time.perf_counter() - started
    rss_loaded, peak_loading = common.rss_bytes(), common.peak_rss_bytes()
    system.run(ids[:64], 4)  # warm-up: first-call allocations and kernel selection
    run = system.run(ids, args.tokens)
    Path(args.out).write_text(json.dumps({
        "prefill_s": run.prefill_s, "decode_s": run.decode_s, "decoded": run.decoded, "tokens": run.tokens,
        "kv_bytes": run.kv_bytes, "weights_bytes": weights, "load_s": load_s,
        "rss_start_bytes": rss_start, "rss_loaded_bytes": rss_loaded, "peak_loading_rss_bytes": peak_loading,
        "rss_end_bytes": common.rss_bytes(), "peak_rss_bytes": common.peak_rss_bytes()}))
    return 0


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory bandwidth of one thread, bytes/s: the best of a few copies of a buffer far larger than the caches
    (each copy reads and writes `nbytes`)."""
    import torch

    torch.set_num_threads(common.THREADS)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def roofline_tok_s(bandwidth: float, weights: int, kv_per_token: float, context: int) -> float:
    """The decode rate if every step only streamed its weights and the held KV from memory once."""
    return bandwidth / (weights + kv_per_token * context)


def run_system(system: str, ids: list[int], tokens: int) -> dict[str, Any]:
    from benchmarks.decode import LlamaCppSystem
    from kvbound.loading import resolve_model

    if system == PEER:
        peer = LlamaCppSystem(resolve_model(), "f16")
        r = peer.run(ids, tokens)
        return {"prefill_s": r.prefill_s, "decode_s": r.decode_s, "tokens": r.tokens, "kv_bytes": r.kv_bytes,
                "weights_bytes": None, "system_info": peer.last.get("system_info"),
                **{k: peer.last.get(k) for k in PHASES}}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        ids_file.write_text(json.dumps(ids))
        name = "transformers" if system == BASELINE else system.removeprefix("kvbound weights ")
        proc = common.run_python(sys.executable, ["-m", "benchmarks.weights", "--child", name, "--ids", str(ids_file),
                                                  "--tokens", str(tokens), "--out", str(out)])
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{system} exited with status {proc.returncode}")
        return json.loads(out.read_text())


def measure(contexts: list[int], tokens: int, repeats: int, peers: bool, compiled: bool = False,
            modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    import kvbound
    from benchmarks.decode import LlamaCppSystem, prompt_ids
    from kvbound.loading import open_checkpoint

    checkpoint = open_checkpoint(None)
    file_bytes = checkpoint.file_tensor_bytes
    tokenizer = checkpoint.make_tokenizer()
    all_ids = prompt_ids(SimpleNamespace(tokenizer=tokenizer), max(contexts))
    systems = [f"kvbound weights {m}" for m in modes] + (["kvbound weights auto+compile"] if compiled else []) + [
        BASELINE]
    unavailable = {}
    if peers:
        ok, why = LlamaCppSystem.available()
        systems += [PEER] if ok else []
        if not ok:
            unavailable["llama.cpp"] = why
    rows = []
    common.pin_threads()
    bandwidth = copy_bandwidth()
    with common.progress(len(contexts) * repeats * len(systems), "weights") as advance:
        for context in contexts:
            ids = all_ids[: min(context, checkpoint.config.max_context - tokens - 1)]
            best: dict[str, dict[str, Any]] = {}
            for rep in range(repeats):
                for system in (systems if rep % 2 == 0 else systems[::-1]):
                    r = run_system(system, ids, tokens)
                    entry = best.setdefault(system, {"system": system, "context": context, "decode_tokens": tokens,
                                                     "decode_s": [], "prefill_s": [], "peak_rss_bytes": 0,
                                                     "weights_bytes": r.get("weights_bytes"), "tokens": r["tokens"],
                                                     "kv_bytes_at_context": r["kv_bytes"]})
                    entry["decode_s"].append(r["decode_s"])
                    entry["prefill_s"].append(r["prefill_s"])
                    entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], r["peak_rss_bytes"])
                    for key in PHASES[:-1]:  # the repeat with the highest peak sets the phases too
                        if r.get(key) is not None and entry["peak_rss_bytes"] == r["peak_rss_bytes"]:
                            entry[key] = r[key]
                    if r.get("system_info"):
                        entry["system_info"] = r["system_info"]
                    advance(note=f"{context} {system}: {tokens / r['decode_s']:.1f} tok/s")
            for entry in best.values():
                entry["decode_tok_s"] = tokens / min(entry["decode_s"])
                if entry.get("weights_bytes"):
                    kv_per_token = entry["kv_bytes_at_context"] / (len(ids) + tokens)
                    entry["roofline_tok_s"] = roofline_tok_s(bandwidth, entry["weights_bytes"], kv_per_token, len(ids))
                    entry["roofline_fraction"] = entry["decode_tok_s"] / entry["roofline_tok_s"]
                entry["prefill_tok_s"] = len(ids) / min(entry["prefill_s"])
                for ref, key in ((BASELINE, "vs_transformers"), (PEER, "vs_llamacpp")):
                    if ref in best:
                        entry[f"decode_{key}"] = min(best[ref]["decode_s"]) / min(entry["decode_s"])
                        entry[f"rss_{key}"] = entry["peak_rss_bytes"] / best[ref]["peak_rss_bytes"]
                rows.append(entry)
    return {"config": {"contexts": contexts, "decode_tokens": tokens, "repeats": repeats,
                       "copy_bandwidth_bytes_per_s": bandwidth,
                       "model": str(checkpoint.path), "gguf_tensor_bytes": file_bytes,
                       "kvbound_kv": "auto (the compute dtype)", "kvbound_version": kvbound.__version__,
                       "timing": "best decode of the repeats; every run its own process; systems alternate"},
            "rows": rows, "unavailable": unavailable}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for r in result["rows"]:
        w = r.get("weights_bytes")
        rows.append([r["system"], r["context"], common.mib(w) if w else "—",
                     f"{w / cfg['gguf_tensor_bytes']:.2f}x" if w else "—", common.mib(r["peak_rss_bytes"]),
                     round(r["prefill_tok_s"], 1), round(r["decode_tok_s"], 2),
                     f"{r['decode_vs_transformers']:.2f}x" if "decode_vs_transformers" in r else "—",
                     f"{r['decode_vs_llamacpp']:.2f}x" if "decode_vs_llamacpp" in r else "—",
                     f"{100 * r['roofline_fraction']:.0f}% of {r['roofline_tok_s']:.0f}" if "roofline_fraction" in r
                     else "—"])
    table = common.markdown_table(
        ["system", "context", "weights MiB", "weights / GGUF tensors", "process peak RSS MiB", "prefill tok/s",
         "decode tok/s", "decode vs transformers", "decode vs llama.cpp", "roofline tok/s (% reached)"], rows)
    phases = [[r["system"], r["context"], common.mib(r["rss_start_bytes"]),
               common.mib(r["rss_loaded_bytes"] - r["rss_start_bytes"]), common.mib(r["rss_end_bytes"]),
               common.mib(r["peak_rss_bytes"]), common.mib(r["kv_bytes_at_context"])]
              for r in result["rows"] if all(r.get(k) is not None for k in PHASES)]
    if phases:
        table += ("\n\nWhere each process's memory goes (RSS, MiB): the runtime once imported (Python with torch, or "
                  "with llama-cpp-python), what loading the model adds, the RSS at the end of the run, its peak, and "
                  "the KV bytes at that context.\n\n" + common.markdown_table(
                      ["system", "context", "runtime imported", "+ model loaded", "end of run", "peak", "KV"], phases))
    notes = [f"- {name}: {why}" for name, why in result.get("unavailable", {}).items()]
    head = (f"{cfg['decode_tokens']} greedy tokens after a prefill of the context, one thread, every run in its own "
            f"process; GGUF tensor data {common.mib(cfg['gguf_tensor_bytes'])} MiB. kvbound's KV is stored in its "
            f"compute dtype (bf16 for the quantized modes). {cfg['timing']}.")
    if "copy_bandwidth_bytes_per_s" in cfg:
        head += (f" Roofline: one-thread copy bandwidth {cfg['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s divided by "
                 "the bytes a decode step must read (weights + the KV held at that context).")
    return "\n".join([head, "", table, *([""] + notes if notes else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weights", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 512 and 8192, one repeat")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp (its venv)")
    parser.add_argument("--compiled", action="store_true", help="add the default weights with --compile")
    parser.add_argument("--modes", nargs="+", choices=MODES, help=f"kvbound weight modes (default: {' '.join(MODES)})")
    parser.add_argument("--name", default=SUITE, help="results file name (default: weights, the report's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.system = args.child
        return child(args)
    contexts = args.contexts or ([512, 8192] if args.quick else [512, 2048, 8192])
    repeats = args.repeats or (1 if args.quick else 2)
    result = measure(contexts, args.tokens, repeats, not args.no_peers, args.compiled, tuple(args.modes or MODES))
    path = common.write_result(args.name, result)
    common.log(f"wrote {path}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
