"""GPU checks for a lent CUDA machine (not CI): decode speed and memory of kvbound vs transformers on a
SmolLM2-shaped model with random weights (the real GGUF is too big to carry; shapes decide speed and memory).
Prints one JSON object; run as `python scripts/gpu_check.py OUT.json`."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = ["src", "."]
import kvbound  # noqa: E402
from kvbound.config import CacheConfig  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192, tie_word_embeddings=True)


def timed(fn, n):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main(out_path: str) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2)
    hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    path = Path(tempfile.mkdtemp())
    hf.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw.setdefault("rope_theta", SMOLLM2["rope_theta"])
    (path / "config.json").write_text(json.dumps(raw))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(49152)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
    hf = hf.cuda().eval()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    ids = torch.randint(0, 49152, (8192,)).tolist()
    for kv in ("bf16", "int8", "int4"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        llm = kvbound.load(path, dtype="bf16", device="cuda")
        weights = torch.cuda.memory_allocated()
        for ctx in (512, 2048, 8000):
            cache = llm.new_cache(CacheConfig(tokens=8192 + 64, dtype=kv))
            t0 = time.perf_counter()
            llm.runner.prefill(ids[:ctx], cache)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            decode = timed(lambda: llm.runner.decode(42, cache), 32)
            results["rows"].append({"system": f"kvbound kv={kv}", "context": ctx, "prefill_tok_s": ctx / prefill,
                                    "decode_tok_s": 1 / decode, "kv_bytes": cache.nbytes,
                                    "peak_allocated": torch.cuda.max_memory_allocated(), "weights": weights})
            cache.free()
            del cache
        del llm
    for ctx in (512, 2048, 8000):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        x = torch.tensor([ids[:ctx]], device="cuda")
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf(x, use_cache=True)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            past = out.past_key_values
            tok = torch.tensor([[42]], device="cuda")

            def step():
                hf(tok, past_key_values=past, use_cache=True)
            decode = timed(step, 32)
        results["rows"].append({"system": "transformers DynamicCache bf16", "context": ctx,
                                "prefill_tok_s": ctx / prefill, "decode_tok_s": 1 / decode,
                                "peak_allocated": torch.cuda.max_memory_allocated()})
    try:
        from kvbound.memory.estimate import estimate

        for ctx in (512, 2048, 8000):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            llm = kvbound.load(path, dtype="bf16", device="cuda")
            reply = llm.generate(" ".join(f"w{i % 9000 + 10}" for i in range(ctx - 16)), raw=True, max_new_tokens=4, temperature=0,
                                 cache=CacheConfig(tokens=ctx))
            peak = torch.cuda.max_memory_allocated() - base
            est = estimate(str(path), context=ctx, dtype="bf16", device="cuda")
            results["rows"].append({"system": "estimator", "context": ctx, "measured_peak": peak,
                                    "predicted_peak": est.total_peak_bytes - est.baseline_bytes,
                                    "estimate": est.__dict__ if hasattr(est, "__dict__") else str(est),
                                    "reply_tokens": len(reply.token_ids)})
            del llm
    except Exception as e:  # the estimator may not exist yet; the rest still reports
        results["estimator_error"] = f"{type(e).__name__}: {e}"
    Path(out_path).write_text(json.dumps(results, indent=1, default=str))
    for row in results["rows"]:
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items() if k != "estimate"})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check.json")
