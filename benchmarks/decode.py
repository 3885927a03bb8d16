"""Prefill and decode speed at long contexts: kvbound as it loads by default (the GGUF's 4-bit weights kept int4,
computing in bf16) with KV bf16/int8/int4, and with dense fp32 weights and KV as a reference, against transformers on
the same GGUF (dequantized to fp32), DynamicCache and StaticCache (and QuantizedCache where its backend is
installed), and llama-cpp-python (same GGUF, f16 and q8_0 KV, its own process per run).

Every system runs on the same thread count (1, then 2), interleaved per context (A, B, C, A, B, C, ...); the
reported time is the best of the repeats, the figure least disturbed by other processes on a shared machine.
llama.cpp is refused unless its build has every SIMD level of this CPU (benchmarks/peers/setup.sh builds it with
GGML_NATIVE=ON); its llama_print_system_info() and torch's CPU capability go into the result.

    python -m benchmarks.decode [--quick] [--contexts 512 2048 8192] [--threads 1 2] [--tokens 32] [--repeats 2]
        [--no-fp32] [--no-transformers]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks import common

SUITE = "decode"
KV_DTYPES = ("bf16", "int8", "int4")  # of the default engine (bf16 compute: its KV is bf16 unless quantized)
BASELINE = "transformers DynamicCache"
DEFAULT = "kvbound KV bf16"  # default weights, default KV: what `kvbound.load()` runs
PEER = "llama.cpp KV f16"
PEER_NO_FA = "llama.cpp KV f16, flash attention off"
FP32 = "kvbound fp32 weights, KV fp32"


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    decoded: int
    tokens: list[int]
    kv_bytes: int


class KvboundSystem:
    def __init__(self, llm, kv_dtype: str, name: str | None = None):
        self.llm, self.kv_dtype = llm, kv_dtype
        self.name = name or f"kvbound KV {kv_dtype}"

    def run(self, ids: list[int], decode_tokens: int) -> Run:
        import torch
        from kvbound.config import CacheConfig

        runner = self.llm.runner
        cache = self.llm.new_cache(CacheConfig(dtype=self.kv_dtype, tokens=len(ids) + decode_tokens + 1))
        try:
            t0 = time.perf_counter()
            logits = runner.prefill(ids, cache)
            token = int(torch.argmax(logits))
            t1 = time.perf_counter()
            out = [token]
            for _ in range(decode_tokens):
                token = int(torch.argmax(runner.decode(token, cache)))
                out.append(token)
            t2 = time.perf_counter()
            return Run(t1 - t0, t2 - t1, decode_tokens, out, cache.nbytes)
        finally:
            cache.free()


class TransformersSystem:
    def __init__(self, model, kind: str, make_cache: Callable[[int], Any]):
        self.model, self.kind, self.make_cache = model, kind, make_cache
        self.name = f"transformers {kind}"

    def run(self, ids: list[int], decode_tokens: int) -> Run:
        import torch

        model = self.model
        cache = self.make_cache(len(ids) + decode_tokens + 1)
        kw = {common.hf_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
        with torch.inference_mode():
            t0 = time.perf_counter()
            inp = torch.tensor([ids])
            position = torch.arange(len(ids))
            out = model(input_ids=inp, cache_position=position, **kw)
            token = int(torch.argmax(out.logits[0, -1]))
            t1 = time.perf_counter()
            tokens = [token]
            for i in range(decode_tokens):
                pos = torch.tensor([len(ids) + i])
                out = model(input_ids=torch.tensor([[token]]), cache_position=pos, **kw)
                token = int(torch.argmax(out.logits[0, -1]))
                tokens.append(token)
            t2 = time.perf_counter()
        return Run(t1 - t0, t2 - t1, decode_tokens, tokens, hf_cache_bytes(cache))


class LlamaCppSystem:
    """llama-cpp-python in its own venv and process (benchmarks/peers/llamacpp_decode.py), same GGUF, same ids."""

    script = common.BENCH / "peers" / "llamacpp_decode.py"

    def __init__(self, model_path, kv: str, flash_attn: bool = True):
        self.model_path, self.kv, self.flash_attn = model_path, kv, flash_attn
        self.name = f"llama.cpp KV {kv}" + ("" if flash_attn else ", flash attention off")
        self.threads = common.THREADS
        self.last: dict[str, Any] = {}

    @staticmethod
    def available() -> tuple[bool, str]:
        info, why = common.llamacpp_build()
        return (True, "") if info else (False, why)

    def run(self, ids: list[int], decode_tokens: int) -> Run:
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "out.json"
            ids_file.write_text(json.dumps(ids))
            proc = common.run_python(common.venv_python("llamacpp"), [
                str(self.script), "--ids", str(ids_file), "--model", str(self.model_path), "--kv", self.kv,
                "--tokens", str(decode_tokens), "--threads", str(self.threads), "--out", str(out),
                *([] if self.flash_attn else ["--no-flash-attn"])],
                threads=self.threads)
            if proc.returncode != 0 or not out.is_file():
                raise RuntimeError(f"{self.script.name} --kv {self.kv} exited with status {proc.returncode}")
            self.last = json.loads(out.read_text())
        r = self.last
        return Run(r["prefill_s"], r["decode_s"], r["decoded"], r["tokens"], r["kv_bytes"])


def hf_cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (whatever its layer type keeps). A tensor subclass that
    stores other tensors (quanto's packed QBits tensors in QuantizedCache) counts what it stores, not its shape."""
    import torch

    seen: set[int] = set()

    def nbytes(t: torch.Tensor) -> int:
        if id(t) in seen:
            return 0
        seen.add(id(t))
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    total = 0
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            total += sum(nbytes(t) for t in items if isinstance(t, torch.Tensor))
    return total


def load_transformers(model_path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


def quantized_cache_backend() -> tuple[str | None, str]:
    """transformers' QuantizedCache needs optimum-quanto or hqq; say which is importable, or why none."""
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        return "quanto", "optimum-quanto importable"
    if importlib.util.find_spec("hqq"):
        return "HQQ", "hqq importable"
    return None, ("unavailable: transformers QuantizedCache needs optimum-quanto or hqq, neither is installed "
                  "(pip install -e '.[bench]' installs optimum-quanto)")


def build_systems(llm, hf, model_path, kv_dtypes=KV_DTYPES, peers: bool = True,
                  llm_fp32=None, quantized_cache: bool = True, flash_attn_off: bool = False,
                  llamacpp_kv: tuple[str, ...] = ("f16", "q8_0")) -> tuple[list, dict[str, str]]:
    systems: list = [KvboundSystem(llm, d) for d in kv_dtypes]
    if llm_fp32 is not None:  # dense fp32 weights and KV: the same numbers transformers computes
        systems.append(KvboundSystem(llm_fp32, "fp32", name=FP32))
    unavailable = {}
    if hf is not None:
        import transformers

        config = hf.config
        systems.append(TransformersSystem(hf, "DynamicCache", lambda n: transformers.DynamicCache(config=config)))
        systems.append(TransformersSystem(hf, "StaticCache",
                                          lambda n: transformers.StaticCache(config=config, max_cache_len=n)))
        backend, why = quantized_cache_backend()
        if not quantized_cache:
            unavailable["transformers QuantizedCache"] = "not run (--no-quantized-cache)"
        elif backend is None:
            unavailable["transformers QuantizedCache"] = why
        else:
            systems.append(TransformersSystem(
                hf, f"QuantizedCache({backend}, int4)",
                lambda n: transformers.QuantizedCache(backend=backend, config=config, nbits=4)))
    if peers:
        ok, why = LlamaCppSystem.available()
        if ok:
            systems += [LlamaCppSystem(model_path, kv) for kv in llamacpp_kv]
            if flash_attn_off:  # on the CPU llama.cpp's f16 KV decodes long contexts faster without it
                systems.append(LlamaCppSystem(model_path, "f16", flash_attn=False))
        else:
            unavailable["llama.cpp"] = why
    return systems, unavailable


def prompt_ids(llm, count: int) -> list[int]:
    text = common.data_file("texts/prideprejudice.txt").read_text()
    ids = llm.tokenizer.encode(text[: count * 8], add_special=True)
    if len(ids) < count:
        raise ValueError(f"the text gives only {len(ids)} tokens, {count} are needed")
    return ids[:count]


def measure(contexts: list[int], decode_tokens: int, repeats: int, kv_dtypes=KV_DTYPES,
            peers: bool = True, fp32: bool = True, threads: list[int] | None = None, hf_peer: bool = True,
            quantized_cache: bool = True, flash_attn_off: bool = False,
            llamacpp_kv: tuple[str, ...] = ("f16", "q8_0")) -> dict[str, Any]:
    threads = threads or [common.THREADS]
    common.pin_threads(max(threads))
    import torch

    import kvbound
    from kvbound.kvcache import native
    from kvbound.loading import resolve_model

    path = resolve_model()
    llm = kvbound.load(path, device="cpu")
    hf = load_transformers(path) if hf_peer else None
    llm_fp32 = kvbound.load(path, weights="fp32", dtype="fp32", device="cpu") if fp32 else None
    max_context = llm.config.max_context
    systems, unavailable = build_systems(llm, hf, path, kv_dtypes, peers, llm_fp32, quantized_cache, flash_attn_off,
                                         llamacpp_kv)
    baseline = BASELINE if hf is not None else DEFAULT
    all_ids = prompt_ids(llm, max(contexts))

    rows: list[dict[str, Any]] = []
    total = len(threads) * len(contexts) * repeats * len(systems)
    with common.progress(total, "decode") as advance:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for system in systems:  # warm-up: first-call allocations, kernel selection (llama.cpp: per process)
                if isinstance(system, LlamaCppSystem):
                    system.threads = n_threads
                else:
                    system.run(all_ids[:64], 4)
            for context in contexts:
                prefill = min(context, max_context - decode_tokens - 1)
                ids = all_ids[:prefill]
                best: dict[str, dict[str, Any]] = {}
                for rep in range(repeats):
                    order = systems if rep % 2 == 0 else systems[::-1]  # A,B,C then C,B,A: no system always first
                    for system in order:
                        run = system.run(ids, decode_tokens)
                        entry = best.setdefault(system.name, {
                            "system": system.name, "threads": n_threads, "context": context,
                            "prefill_tokens": prefill, "decode_tokens": decode_tokens, "prefill_s": [],
                            "decode_s": [], "kv_bytes": run.kv_bytes, "tokens": run.tokens})
                        entry["prefill_s"].append(run.prefill_s)
                        entry["decode_s"].append(run.decode_s)
                        if isinstance(system, LlamaCppSystem):
                            entry["peak_rss_bytes"] = max(entry.get("peak_rss_bytes", 0),
                                                          system.last["peak_rss_bytes"])
                            entry["system_info"] = system.last.get("system_info")
                        advance(note=f"{n_threads} thr {context} {system.name}: "
                                     f"{decode_tokens / run.decode_s:.1f} tok/s")
                reference = best[baseline]
                peers_f16 = [best[n] for n in (PEER, PEER_NO_FA) if n in best]  # llama.cpp f16 at its best here
                peer = min(peers_f16, key=lambda e: min(e["decode_s"])) if peers_f16 else None
                for entry in best.values():
                    entry["prefill_tok_s"] = prefill / min(entry["prefill_s"])
                    entry["decode_tok_s"] = decode_tokens / min(entry["decode_s"])
                    entry["prefill_vs_baseline"] = min(reference["prefill_s"]) / min(entry["prefill_s"])
                    entry["decode_vs_baseline"] = min(reference["decode_s"]) / min(entry["decode_s"])
                    if peer is not None:
                        entry["prefill_vs_llamacpp"] = min(peer["prefill_s"]) / min(entry["prefill_s"])
                        entry["decode_vs_llamacpp"] = min(peer["decode_s"]) / min(entry["decode_s"])
                        entry["llamacpp_reference"] = peer["system"]
                    entry["greedy_tokens_equal_to_baseline"] = _common_prefix(entry["tokens"], reference["tokens"])
                    rows.append(entry)
    return {
        "config": {"contexts": contexts, "threads": threads, "decode_tokens": decode_tokens, "repeats": repeats,
                   "model": str(path), "kvbound_weights": llm.plan.mode, "kvbound_storage": llm.plan.counts(),
                   "kvbound_compute_dtype": llm.dtype_name, "transformers_dtype": "float32",
                   "transformers_attention": hf.config._attn_implementation if hf is not None else None,
                   "kvbound_prefill_chunk": llm.runner.chunk, "transformers_prefill": "one forward pass",
                   "kvbound_kv_decode": "native C kernel" if native.available() else "eager (SDPA)",
                   "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "llamacpp": "own process per run, built for this CPU (GGML_NATIVE=ON), n_batch 512, flash "
                               "attention on, extra CPU buffers (repacking) on",
                   "llamacpp_system_info": next((r["system_info"] for r in rows if r.get("system_info")), None),
                   "flash_attn_off": flash_attn_off,
                   "in_process_peak_rss_bytes": common.peak_rss_bytes(),
                   "baseline": baseline, "timing": "best of repeats, systems interleaved per context"},
        "rows": rows,
        "unavailable": unavailable,
    }


def _common_prefix(a: list[int], b: list[int]) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return f"{n}/{min(len(a), len(b))}"


def _table(result: dict[str, Any]) -> str:
    def x(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "—"

    base = "HF Dynamic" if result["config"].get("baseline", BASELINE) == BASELINE else "kvbound default"
    rows = [[r.get("threads", 1), r["system"], r["context"], round(r["prefill_tok_s"], 1), x(r, "prefill_vs_llamacpp"),
             round(r["decode_tok_s"], 2), x(r, "decode_vs_llamacpp"), x(r, "decode_vs_baseline"),
             common.mib(r["kv_bytes"]), common.mib(r.get("peak_rss_bytes")), r["greedy_tokens_equal_to_baseline"]]
            for r in result["rows"]]
    return common.markdown_table(
        ["threads", "system", "context", "prefill tok/s", "prefill vs llama.cpp f16", "decode tok/s",
         "decode vs llama.cpp f16", f"decode vs {base}", "KV MiB", "own process peak RSS MiB",
         f"greedy tokens = {base}"], rows)


def markdown(result: dict[str, Any]) -> str:
    notes = [f"- {name}: {why}" for name, why in result.get("unavailable", {}).items()]
    cfg_rss = result["config"].get("in_process_peak_rss_bytes")
    if cfg_rss:
        notes.append(f"- kvbound and transformers share one process (the models of all in-process systems "
                     f"loaded): its peak RSS was "
                     f"{common.mib(cfg_rss):,.0f} MiB; llama.cpp runs in its own process per run.")
    cfg = result["config"]
    weights = (f"kvbound's default weights ({cfg['kvbound_weights']}: "
               f"{', '.join(f'{n} {k}' for k, n in cfg['kvbound_storage'].items())} matrices, computing in "
               f"{cfg['kvbound_compute_dtype']}) unless the row says fp32; " if "kvbound_weights" in cfg else "")
    head = (f"{weights}{cfg['decode_tokens']} greedy tokens after a prefill of the context (capped at the model's "
            f"8192 minus the decoded tokens); kvbound prefills in chunks of {cfg['kvbound_prefill_chunk']}, "
            f"transformers in {cfg['transformers_prefill']}; {cfg['timing']}."
            + (f" int8/int4 KV decode: {cfg['kvbound_int_kv_decode']}." if "kvbound_int_kv_decode" in cfg else "")
            + (f" KV decode: {cfg['kvbound_kv_decode']}; torch CPU capability {cfg['torch_cpu_capability']}."
               if "kvbound_kv_decode" in cfg else "")
            + (f" llama.cpp: {cfg['llamacpp']}; its system info: `{cfg['llamacpp_system_info']}`."
               if cfg.get("llamacpp_system_info") else "")
            + " A `vs llama.cpp f16` ratio is against the faster llama.cpp f16 row of the same run and threads.")
    parts = [head, "", _table(result), *([""] + notes if notes else [])]
    for run in result.get("supplementary", []):
        c = run["config"]
        what = ("llama.cpp f16 KV with flash attention off as well as on (on the CPU it decodes long contexts "
                "faster off), " if c.get("flash_attn_off") else "")
        parts += ["", f"A second run, {what}interleaved with kvbound's default in one process, "
                      f"{c['repeats']} repeat(s): `{run['machine']['command']}` — {run['machine']['date']}; load "
                      f"average at start {run['machine']['load_average_at_start']}.", "", _table(run)]
    return "\n".join(parts)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Decode tok/s and KV MiB against context, one line per system."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (ax_rate, ax_kv) = plt.subplots(1, 2, figsize=(12, 4.5))
    thread_counts = sorted({r.get("threads", 1) for r in result["rows"]})
    for name in dict.fromkeys(r["system"] for r in result["rows"]):
        style = "-" if name.startswith("kvbound") else "--"
        for n in thread_counts:
            rows = sorted((r for r in result["rows"] if r["system"] == name and r.get("threads", 1) == n),
                          key=lambda r: r["context"])
            x = [r["context"] for r in rows]
            label = f"{name}, {n} thread{'s' * (n > 1)}" if len(thread_counts) > 1 else name
            ax_rate.plot(x, [r["decode_tok_s"] for r in rows], style, marker="o" if n == 1 else "s", label=label)
            if n == thread_counts[0]:
                ax_kv.plot(x, [r["kv_bytes"] / 2**20 for r in rows], style, marker="o", label=name)
    for ax in (ax_rate, ax_kv):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["config"]["contexts"], [str(c) for c in result["config"]["contexts"]])
        ax.grid(alpha=0.3)
    ax_rate.set(xlabel="tokens of context", ylabel="decode tokens/s", title="decode speed")
    ax_kv.set(xlabel="tokens of context", ylabel="KV cache (MiB)", title="KV cache size")
    ax_rate.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 512 and 2048, 16 tokens")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--tokens", type=int, help="greedy tokens decoded per run")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp (its venv)")
    parser.add_argument("--no-fp32", action="store_true", help="skip kvbound with dense fp32 weights and KV")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers (DynamicCache is then "
                        "replaced as the baseline by kvbound's default)")
    parser.add_argument("--no-quantized-cache", action="store_true", help="skip transformers' QuantizedCache")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts, each a pass over every system "
                        "(default: 1 and 2; --quick: 1)")
    parser.add_argument("--kv", nargs="+", choices=KV_DTYPES, help=f"kvbound's KV types (default: {KV_DTYPES})")
    parser.add_argument("--flash-attn-off", action="store_true",
                        help="add llama.cpp f16 KV with flash attention off (its faster setting at long contexts)")
    parser.add_argument("--llamacpp-kv", nargs="+", choices=("f16", "q8_0"), default=["f16", "q8_0"],
                        help="llama.cpp's KV types (flash attention on)")
    parser.add_argument("--supplement", action="store_true",
                        help="keep results/decode.json's run and add this invocation's run beside it (a second table)")
    args = parser.parse_args(argv)
    contexts = args.contexts or ([512, 2048] if args.quick else [512, 2048, 8192])
    tokens = args.tokens or (16 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    threads = args.threads or ([1] if args.quick else [1, 2])
    result = measure(contexts, tokens, repeats, tuple(args.kv or KV_DTYPES), peers=not args.no_peers,
                     fp32=not args.no_fp32, threads=threads, hf_peer=not args.no_transformers,
                     quantized_cache=not args.no_quantized_cache, flash_attn_off=args.flash_attn_off,
                     llamacpp_kv=tuple(args.llamacpp_kv))
    main_run = common.read_result(SUITE) if args.supplement else None
    if main_run is not None:
        run = {"machine": common.machine_info(max(threads)), **result, "quick": args.quick}
        main_run["supplementary"] = [s for s in main_run.get("supplementary", [])
                                     if s["config"].get("flash_attn_off") != args.flash_attn_off] + [run]
        common.rewrite_result(SUITE, main_run)
        print(markdown(run))
        return 0
    png = plot(result, common.RESULTS / "decode.png")
    result["plot"] = str(png.relative_to(common.ROOT)) if png else None
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
