"""Context compression against NVIDIA kvpress, one protocol for both, on the same token ids.

Protocol: the first C tokens of Pride and Prejudice are the context, the next S (512) are scored.
- kvpress (its own venv, benchmarks/peers/kvpress_ppl.py): prefill the context in one pass with a press at
  compression ratio r = 1 - 1/f, then score the S tokens in one pass over the compressed cache.
- kvbound: a cache of C/f + S tokens with an eviction policy; prefill the context (chunks of a quarter of the
  capacity, evicting as it fills), then score the S tokens in one step: making room for them leaves exactly
  C/f context tokens, so the scored tokens see as many context tokens as under kvpress.
Kept-token counts are recorded for both. kvpress keeps C/f tokens per layer and KV head (each head chooses);
kvbound keeps C/f tokens for all layers and heads alike (one choice per token; `compactor` chooses per layer and KV
head) and re-assigns positions.

    python -m benchmarks.compression [--quick] [--context 3584] [--scored 512]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

SUITE = "kvpress"
FRACTIONS = (2, 4, 8)
KVBOUND_POLICIES = ("window", "h2o", "snapkv", "tova", "keydiff", "compactor")
# kvbound policy ↔ the kvpress press built on the same idea (None: no counterpart in the other engine)
PAIRS = [("window", "StreamingLLMPress"), ("snapkv", "SnapKVPress"), ("tova", "TOVAPress"),
         ("keydiff", "KeyDiffPress"), ("compactor", "CompactorPress"), ("h2o", None),
         (None, "KnormPress"), (None, "ExpectedAttentionPress")]
PEER = common.BENCH / "peers" / "kvpress_ppl.py"


def kvbound_runs(llm, context: list[int], continuation: list[int], advance) -> list[dict[str, Any]]:
    import time

    import torch
    from kvbound.config import CacheConfig

    C, S = len(context), len(continuation) - 1
    targets = torch.tensor(continuation[1:])
    rows = []
    runs = [("none", 1)] + [(p, f) for p in KVBOUND_POLICIES for f in FRACTIONS]
    for policy, f in runs:
        started = time.perf_counter()
        cfg = CacheConfig() if policy == "none" else CacheConfig(tokens=C // f + S, policy=policy)
        cache = llm.new_cache(cfg)
        try:
            chunk = min(llm.runner.chunk, max(1, cache.capacity // 4)) if cache.policy.evicts else None
            llm.runner.prefill(context, cache, chunk)
            logits = llm.runner.score(continuation[:-1], cache)  # (S, V)
            kept = cache.num_tokens - S
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll = -float(logp.gather(1, targets[:, None]).mean())
        finally:
            cache.free()
        rows.append({"engine": "kvbound", "method": policy, "compression_ratio": 1.0 - 1.0 / f,
                     "context_tokens": C, "kept_context_tokens": kept, "scored_tokens": S, "nll": nll,
                     "ppl": math.exp(nll), "elapsed_s": time.perf_counter() - started})
        advance(note=f"kvbound {policy} 1/{f}: ppl {math.exp(nll):.3f}")
    return rows


def measure(context_tokens: int, scored: int, saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """kvbound's rows, then kvpress's: run in its venv, or taken from `saved` (a result of the same protocol)."""
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    import kvbound
    from kvbound.loading import resolve_model

    path = resolve_model()
    llm = kvbound.load(path, dtype="fp32", weights="fp32", device="cpu")  # dense, as kvpress computes
    text = common.data_file("texts/prideprejudice.txt").read_text()[: (context_tokens + scored) * 8]
    ids = llm.tokenizer.encode(text, add_special=True)[: context_tokens + scored + 1]
    context, continuation = ids[:context_tokens], ids[context_tokens:]
    with common.progress(1 + len(KVBOUND_POLICIES) * len(FRACTIONS), "kvbound") as advance:
        rows = kvbound_runs(llm, context, continuation, advance)
    del llm

    peer: dict[str, Any] = {}
    python = common.venv_python("kvpress")
    if saved is not None:
        peer = saved["peer"]
        rows += [r for r in saved["rows"] if r["engine"] == "kvpress"]
    elif not python.is_file():
        peer = {"error": f"no kvpress venv at {python.parent.parent}; see benchmarks/README (setup)"}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "out.json"
            ids_file.write_text(json.dumps({"context": context, "continuation": continuation}))
            proc = common.run_python(python, [str(PEER), "--ids", str(ids_file), "--model", str(path),
                                              "--fractions", *map(str, FRACTIONS), "--out", str(out)])
            if proc.returncode == 0 and out.is_file():
                peer = json.loads(out.read_text())
                rows += peer.pop("rows")
            else:
                peer = {"error": f"kvpress_ppl.py exited with status {proc.returncode}"}
    for engine in ("kvbound", "kvpress"):
        full = next((r["ppl"] for r in rows if r["engine"] == engine and r["method"] == "none" and "ppl" in r), None)
        for r in rows:
            if r["engine"] == engine and full and "ppl" in r:
                r["delta_ppl_pct"] = 100.0 * (r["ppl"] / full - 1.0)
    return {"config": {"context_tokens": context_tokens, "scored_tokens": scored, "fractions": list(FRACTIONS),
                       "text": "data/texts/prideprejudice.txt (from the start)", "model": str(path),
                       "model_dtype": "fp32", "kvbound_evict_fraction": 0.1},
            "rows": rows, "peer": peer}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = result["rows"]

    def find(engine: str, method: str | None, f: int | None) -> dict[str, Any] | None:
        if method is None:
            return None
        ratio = 0.0 if f is None else 1.0 - 1.0 / f
        return next((r for r in rows if r["engine"] == engine and r["method"] == method
                     and abs(r["compression_ratio"] - ratio) < 1e-9), None)

    def cell(r: dict[str, Any] | None) -> str | None:
        if r is None:
            return None
        if "error" in r:
            return "error"
        return f"{r['ppl']:.3f} ({r.get('delta_ppl_pct', 0.0):+.1f}%)"

    table = []
    base_kvb, base_kvp = find("kvbound", "none", None), find("kvpress", "none", None)
    table.append(["full cache", "—", "full", cell(base_kvb), "(no press)", cell(base_kvp)])
    for f in FRACTIONS:
        for ours, theirs in PAIRS:
            a, b = find("kvbound", ours, f), find("kvpress", theirs, f)
            kept = (a or b or {}).get("kept_context_tokens")
            table.append([f"1/{f}", kept, ours or "—", cell(a), theirs or "—", cell(b)])
    head = (f"Context: the first {cfg['context_tokens']} tokens; scored: the next {cfg['scored_tokens']} tokens, "
            "perplexity (Δ vs the same engine's full cache). Same token ids, fp32 weights from the same GGUF.")
    errors = [f"- {r['engine']} {r['method']}: {r['error']}" for r in rows if "error" in r]
    if result["peer"].get("error"):
        errors.append(f"- kvpress: {result['peer']['error']}")
    return "\n".join([head, "", common.markdown_table(
        ["kept", "kept context tokens", "kvbound policy", "kvbound PPL", "kvpress press", "kvpress PPL"], table),
        *([""] + errors if errors else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a context of 1024 tokens instead of 3584")
    parser.add_argument("--context", type=int)
    parser.add_argument("--scored", type=int, default=512)
    parser.add_argument("--reuse-peers", action="store_true",
                        help="keep the saved kvpress rows (same context and scored tokens) instead of running kvpress")
    args = parser.parse_args(argv)
    context = args.context or (1024 if args.quick else 3584)
    saved = None
    if args.reuse_peers:
        saved = common.read_result(SUITE) or {}
        config = saved.get("config", {})
        if (config.get("context_tokens"), config.get("scored_tokens")) != (context, args.scored) or not any(
                r["engine"] == "kvpress" for r in saved.get("rows", [])):
            parser.error(f"benchmarks/results/{SUITE}.json holds no kvpress rows for {context} context and "
                         f"{args.scored} scored tokens")
    result = measure(context, args.scored, saved)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
