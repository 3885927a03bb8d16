"""llama.cpp (llama-cpp-python) side of the quality benchmark's KV-quantization comparison; runs inside
benchmarks/.venvs/llamacpp. Started by benchmarks/quality.py once per KV type, each run its own process.

Evaluates the given token ids (batches of 512, logits for every position) in one context that holds them all, and
scores them as kvbound.engine.perplexity does: token i predicted from position i-1, for i = 1..N-1; perplexity is
exp of the mean negative log-likelihood (log-softmax in float64).

    benchmarks/.venvs/llamacpp/bin/python benchmarks/peers/llamacpp_ppl.py --ids IDS.json --model M.gguf \
        --kv q8_0 --out OUT.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402
from benchmarks.peers.llamacpp_decode import BATCH, kv_bytes, open_model, peer_arguments  # noqa: E402


def mean_nll(scores, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under the logits `scores` (N, V) of positions 0..N-2."""
    import numpy as np

    total = 0.0
    for start in range(0, len(ids) - 1, BATCH):  # float64 log-softmax a batch of rows at a time
        stop = min(start + BATCH, len(ids) - 1)
        logits = scores[start:stop].astype(np.float64)  # (T, V)
        peak = logits.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))  # (T,)
        targets = np.asarray(ids[start + 1:stop + 1])
        total += float((log_norm - logits[np.arange(stop - start), targets]).sum())
    return total / (len(ids) - 1)


def main() -> int:
    args = peer_arguments("JSON list of the token ids to score").parse_args()

    common.pin_threads(args.threads)
    import llama_cpp

    ids = json.loads(args.ids.read_text())
    if len(ids) < 2:
        raise SystemExit(f"{args.ids} holds {len(ids)} token ids; at least 2 are needed to score one")
    llm = open_model(args, n_ctx=len(ids), logits_all=True)
    t0 = time.perf_counter()
    llm.eval(ids)
    nll = mean_nll(llm.scores[: len(ids)], ids)
    elapsed = time.perf_counter() - t0
    args.out.write_text(json.dumps({
        "system": f"llama.cpp KV {args.kv}", "kv_dtype": args.kv, "ppl": math.exp(nll), "nll": nll,
        "scored_tokens": len(ids) - 1, "n_ctx": llm.n_ctx(), "batch": BATCH, "flash_attn": args.flash_attn,
        "extra_bufts": args.extra_bufts, "system_info": llama_cpp.llama_print_system_info().decode(),
        "kv_bytes": kv_bytes(llm, args.kv), "elapsed_s": elapsed,
        "peak_rss_bytes": common.peak_rss_bytes(), "llama_cpp_version": llama_cpp.__version__,
        "machine": common.machine_info(args.threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
