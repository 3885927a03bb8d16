"""What a bounded KV cache costs in quality, against the same run with the full cache.

1. Perplexity on the first N tokens of Pride and Prejudice, fed continuously (StreamingLLM-style), with KV
   budgets of N/2, N/4, N/8 tokens for every eviction policy, and with the full cache stored fp32/bf16/int8/int4
   (dense fp32 weights).
2. KV quantization against llama.cpp: the same N token ids scored with the full cache by kvbound as it loads by
   default (the GGUF's int4/int8 weights, bf16 compute) with KV fp32/bf16/int8/int4, and by llama-cpp-python (same
   GGUF, its own venv and process per run) with KV f16/q8_0/q4_0; each against its own unquantized KV.
3. Passkey retrieval (raw completion, greedy, 8 tokens) at budgets of 1/2 and 1/4 of the prompt per policy.

    python -m benchmarks.quality [--quick] [--tokens 4096] [--passkey-max-tokens 2500] [--no-peers]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

SUITE = "quality"
POLICIES = ("window", "h2o", "snapkv", "tova")
FRACTIONS = (2, 4, 8)
PASSKEY_FRACTIONS = (2, 4)
STORAGE = ("fp32", "bf16", "int8", "int4")
LLAMACPP_KV = ("f16", "q8_0", "q4_0")
LLAMACPP_SCRIPT = common.BENCH / "peers" / "llamacpp_ppl.py"
KV_PAIRS = (("fp32", "f16"), ("bf16", None), ("int8", "q8_0"), ("int4", "q4_0"))  # kvbound ↔ llama.cpp, by bits
EVEN_POINTS = 0.5  # a gap in ΔPPL below this many percentage points is called even (as the kvpress headlines do)


def load_llm(default_weights: bool = False):
    """Dense fp32 weights (the budget table; the kvpress suite runs the same), or with `default_weights` the
    model as `kvbound.load()` gives it: the GGUF's quantized matrices kept int4/int8, computing in bf16 — the
    weights llama.cpp runs. (`load(dtype="fp32", weights="auto")` would dequantize them to dense fp32 again.)"""
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    import kvbound

    if default_weights:
        return kvbound.load(device="cpu")
    return kvbound.load(dtype="fp32", weights="fp32", device="cpu")


def ppl_text(tokens: int) -> str:
    """The start of the text, long enough for `tokens` tokens (about 4 characters each; 8 leaves room)."""
    return common.data_file("texts/prideprejudice.txt").read_text()[: tokens * 8]


def perplexity_runs(llm, tokens: int, advance) -> list[dict[str, Any]]:
    from kvbound.config import CacheConfig
    from kvbound.engine.perplexity import perplexity

    text = ppl_text(tokens)
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
    return with_delta(rows, "fp32")  # the first fp32 row is the full cache's


def kvbound_kv_runs(llm, tokens: int, advance) -> list[dict[str, Any]]:
    """Full-cache perplexity per KV storage; Δ against fp32 KV."""
    from kvbound.config import CacheConfig
    from kvbound.engine.perplexity import perplexity

    text = ppl_text(tokens)
    rows = []
    for dtype in STORAGE:
        r = perplexity(llm, text, CacheConfig(dtype=dtype), max_tokens=tokens)
        rows.append({"kv_dtype": dtype, "ppl": r.ppl, "scored_tokens": r.tokens, "kv_bytes": r.kv_peak_bytes,
                     "elapsed_s": r.elapsed_s})
        advance(note=f"ppl default weights KV {dtype}: {r.ppl:.3f}")
    return with_delta(rows, "fp32")


def scored_ids(llm, tokens: int) -> list[int]:
    """The ids kvbound.engine.perplexity scores for `tokens` tokens of the text, for llama.cpp to score too."""
    return llm.tokenizer.encode(ppl_text(tokens), add_special=True)[:tokens]


def llamacpp_kv_runs(model_path: Path, ids: list[int], advance) -> list[dict[str, Any]]:
    """llama.cpp's perplexity on `ids` per KV type, each run in its own process; a failed run is a row with an
    error, not the end of the suite. Δ against f16 KV."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for kv in LLAMACPP_KV:
            out = Path(tmp) / f"{kv}.json"
            proc = common.run_python(common.venv_python("llamacpp"), [
                str(LLAMACPP_SCRIPT), "--ids", str(ids_file), "--model", str(model_path), "--kv", kv,
                "--out", str(out)])
            if proc.returncode != 0 or not out.is_file():
                rows.append({"kv_dtype": kv, "error": f"{LLAMACPP_SCRIPT.name} exited with status {proc.returncode}"})
                advance(note=f"ppl llama.cpp KV {kv}: failed")
                continue
            r = json.loads(out.read_text())
            r.pop("machine", None)  # the suite's own machine facts cover this process's machine
            rows.append(r)
            advance(note=f"ppl llama.cpp KV {kv}: {r['ppl']:.3f}")
    return with_delta(rows, "f16")


def with_delta(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Each row's ΔPPL % against the row stored as `reference` (no Δ where that row failed)."""
    base = next((r["ppl"] for r in rows if r["kv_dtype"] == reference and "ppl" in r), None)
    for r in rows:
        if base is not None and "ppl" in r:
            r["delta_ppl_pct"] = 100.0 * (r["ppl"] / base - 1.0)
    return rows


def kv_quant_runs(tokens: int, peers: bool, advance) -> dict[str, Any]:
    from kvbound.loading import resolve_model

    llm = load_llm(default_weights=True)
    kvbound_rows = kvbound_kv_runs(llm, tokens, advance)
    result: dict[str, Any] = {
        "kvbound_weights": llm.plan.mode, "kvbound_storage": llm.plan.counts(), "kvbound_compute_dtype": llm.dtype_name,
        "llamacpp_setup": "in its own process per KV type (n_ctx = the ids, n_batch 512, logits of every position, "
                          "flash attention on, use_extra_bufts on)",
        "kvbound": kvbound_rows, "llamacpp_rows": [], "unavailable": {}}
    if not peers:
        result["unavailable"]["llama.cpp"] = "skipped (--no-peers)"
        return result
    info, why = common.llamacpp_build()  # refuses a build without this CPU's SIMD
    if info is None:
        result["unavailable"]["llama.cpp"] = why
        return result
    result["llamacpp_system_info"] = info
    ids = scored_ids(llm, tokens)[: kvbound_rows[0]["scored_tokens"] + 1]  # exactly the ids kvbound scored
    result["llamacpp_rows"] = llamacpp_kv_runs(resolve_model(), ids, advance)
    return result


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


def measure(tokens: int, passkey_max: int, peers: bool = True) -> dict[str, Any]:
    llm = load_llm()
    cases = passkey_cases(llm, passkey_max)
    total = (len(STORAGE) + len(POLICIES) * len(FRACTIONS) + len(STORAGE) + (len(LLAMACPP_KV) if peers else 0)
             + len(cases) * (1 + len(POLICIES) * len(PASSKEY_FRACTIONS)))
    with common.progress(total, "quality") as advance:
        ppl = perplexity_runs(llm, tokens, advance)
        kv_quant = kv_quant_runs(tokens, peers, advance)
        passkey = passkey_runs(llm, cases, advance)
    return {"config": {"ppl_tokens": tokens, "ppl_text": "data/texts/prideprejudice.txt (from the start)",
                       "ppl_chunk": 512, "policies": list(POLICIES), "fractions": list(FRACTIONS),
                       "passkey_file": "data/passkey/dev-classic.jsonl", "passkey_max_prompt_tokens": passkey_max,
                       "passkey_fractions": list(PASSKEY_FRACTIONS), "model_dtype": "fp32"},
            "perplexity": ppl, "kv_quantization": kv_quant, "passkey": passkey}


def passkey_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["policy"]), []).append(r)
    return [{"budget": b, "policy": p, "hits": sum(r["hit"] for r in rs), "cases": len(rs),
             "errors": sum(r["error"] is not None for r in rs)} for (b, p), rs in groups.items()]


def kv_quant_verdicts(kv: dict[str, Any]) -> list[str]:
    """Per bit width both systems store, which loses less perplexity against its own unquantized KV."""
    ours = {r["kv_dtype"]: r for r in kv.get("kvbound", []) if "delta_ppl_pct" in r}
    theirs = {r["kv_dtype"]: r for r in kv.get("llamacpp_rows", []) if "delta_ppl_pct" in r}
    lines = []
    for mine, peer in KV_PAIRS[2:]:  # the quantized pairs
        if mine in ours and peer in theirs:
            a, b = ours[mine]["delta_ppl_pct"], theirs[peer]["delta_ppl_pct"]
            who = ("about even" if abs(a - b) < EVEN_POINTS
                   else f"{'kvbound' if a < b else 'llama.cpp'} loses less by {abs(a - b):.2f} points")
            lines.append(f"KV {mine} (kvbound) {a:+.2f}% against llama.cpp {peer} {b:+.2f}% "
                         f"(ΔPPL vs own unquantized KV) — {who}.")
    return lines


def kv_quant_markdown(kv: dict[str, Any]) -> list[str]:
    ours = {r["kv_dtype"]: r for r in kv["kvbound"]}
    theirs = {r["kv_dtype"]: r for r in kv["llamacpp_rows"]}

    def cells(row: dict[str, Any] | None) -> list[Any]:
        if row is None:
            return [None, None]
        if "error" in row:
            return [f"failed: {row['error']}", None]
        return [f"{row['ppl']:.3f}", f"{row['delta_ppl_pct']:+.2f}%" if "delta_ppl_pct" in row else None]

    rows = []
    for mine, peer in KV_PAIRS:
        a, b = ours.get(mine), theirs.get(peer) if peer else None
        kv_mib = " / ".join("—" if r is None or "kv_bytes" not in r else f"{common.mib(r['kv_bytes']):g}"
                            for r in (a, b))
        rows.append([f"{mine} / {peer or '—'}", *cells(a), *cells(b), kv_mib])
    storage = ", ".join(f"{n} {k}" for k, n in kv["kvbound_storage"].items())
    scored = kv["kvbound"][0]["scored_tokens"] if kv["kvbound"] else 0
    head = (f"**KV quantization against llama.cpp**: the same {scored + 1} token ids ({scored} scored) with the full "
            f"cache, on the GGUF's own weights: kvbound as it loads by default (weights {kv['kvbound_weights']}: "
            f"{storage} matrices, computing in {kv['kvbound_compute_dtype']}), llama.cpp {kv['llamacpp_setup']}. Each "
            "system's Δ is against its own unquantized KV (kvbound fp32, llama.cpp f16); the two baselines differ "
            "because the two engines compute differently (kvbound bf16 activations, llama.cpp its quantized dot "
            "products).")
    parts = [head, "",
             common.markdown_table(["KV storage (kvbound / llama.cpp)", "kvbound PPL", "ΔPPL vs fp32 KV",
                                    "llama.cpp PPL", "ΔPPL vs f16 KV", "KV MiB (kvbound / llama.cpp)"], rows)]
    if kv["kvbound_compute_dtype"] == "bf16":
        parts += ["", ("kvbound computes in bf16 here, so its K and V are bf16 values before they are stored: fp32 "
                       "and bf16 KV hold the same numbers.")]
    parts += ["", ("The formats differ: kvbound's int8/int4 are KIVI-style (keys per channel over a block's tokens, "
                   "values per token in groups, asymmetric scale and zero, the newest block kept unquantized), "
                   "llama.cpp's q8_0/q4_0 symmetric blocks of 32 values with one scale, keys and values alike; "
                   "the KV MiB column shows what each costs.")]
    notes = kv_quant_verdicts(kv) + [f"{name}: {why}" for name, why in kv.get("unavailable", {}).items()]
    if notes:
        parts += ["", *[f"- {n}" for n in notes]]
    return parts


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    ppl_rows = [[r["budget"], r["policy"], r["kv_dtype"], r["kv_tokens"], f"{r['ppl']:.3f}",
                 f"{r['delta_ppl_pct']:+.2f}%", common.mib(r["kv_peak_bytes"]), r["evicted_tokens"]]
                for r in result["perplexity"]]
    scored = result["perplexity"][0]["scored_tokens"] if result["perplexity"] else 0
    share = {r["kv_tokens"] // r["chunk"] for r in result["perplexity"] if r["budget"] != "full" and "chunk" in r}
    share = f"1/{min(share)}" if share else "a share"  # of the capacity, under eviction: as the run chose
    parts = [f"**Perplexity**, first {cfg['ppl_tokens']} tokens ({scored} scored), fed continuously in chunks of "
             f"at most {cfg['ppl_chunk']} ({share} of the capacity under eviction), never reset.", "",
             common.markdown_table(["KV budget", "policy", "KV dtype", "KV tokens", "PPL", "ΔPPL vs full fp32",
                                    "KV peak MiB", "evicted"], ppl_rows), ""]
    if "kv_quantization" in result:  # optional: a results file may lack this section
        parts += [*kv_quant_markdown(result["kv_quantization"]), ""]
    pk = passkey_summary(result["passkey"])
    lengths = sorted({r["prompt_tokens"] for r in result["passkey"]})
    parts += [f"**Passkey retrieval** ({cfg['passkey_file']}, prompts of {', '.join(map(str, lengths))} tokens, "
              "raw completion, greedy 8 tokens; budget as a fraction of the prompt).", "",
              common.markdown_table(["KV budget", "policy", "hits", "errors"],
                                    [[s["budget"], s["policy"], f"{s['hits']}/{s['cases']}", s["errors"]] for s in pk])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1536 tokens of perplexity, passkey prompts <= 1000 tokens")
    parser.add_argument("--tokens", type=int, help="tokens of text for perplexity (N)")
    parser.add_argument("--passkey-max-tokens", type=int, help="longest passkey prompt used")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp (its venv)")
    args = parser.parse_args(argv)
    tokens = args.tokens or (1536 if args.quick else 4096)
    passkey_max = args.passkey_max_tokens or (1000 if args.quick else 2500)
    result = measure(tokens, passkey_max, peers=not args.no_peers)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
