"""llama.cpp (llama-cpp-python) side of the decode benchmark; runs inside benchmarks/.venvs/llamacpp.
Started by benchmarks/decode.py once per context and KV type, interleaved with the in-process systems, so each
run is its own process and its peak RSS is its own.

Prefill the given token ids (batches of 512), then decode greedily (argmax of the last logits), on --threads
threads. llama.cpp runs as its users get it at its fastest: built for this CPU (benchmarks/peers/setup.sh), flash
attention on, extra CPU weight buffers (repacking) on; its llama_print_system_info() goes into the result.

    benchmarks/.venvs/llamacpp/bin/python benchmarks/peers/llamacpp_decode.py --ids IDS.json --model M.gguf \
        --kv f16 --tokens 32 --threads 1 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

BATCH = 512  # n_batch and n_ubatch
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0
# q8_0: blocks of 32 int8 + one fp16 scale; q4_0: blocks of 32 4-bit values (16 bytes) + one fp16 scale
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def no_extra_buffers() -> None:
    """Turn off llama.cpp's extra CPU weight buffers (weight repacking; on by default), which crash with quantized
    weights on some CPUs. llama-cpp-python has no keyword for `use_extra_bufts`, so the default model params that `Llama()` reads
    (from the low-level module) are wrapped here, in this benchmark process only."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def kv_bytes(llm, kv: str) -> int:
    """Bytes of K and V for all layers and `llm.n_ctx()` positions, stored as `kv`, from the GGUF's metadata."""
    meta = llm.metadata
    arch = meta.get("general.architecture", "llama")
    heads, kv_heads = int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])
    head_dim = int(meta[f"{arch}.embedding_length"]) // heads
    kv_values_per_token = 2 * int(meta[f"{arch}.block_count"]) * kv_heads * head_dim  # K and V, all layers
    return int(kv_values_per_token * BYTES_PER_VALUE[kv] * llm.n_ctx())


def peer_arguments(ids_help: str) -> argparse.ArgumentParser:
    """The arguments every llama.cpp peer script takes: the token ids, the GGUF, the KV type, the output file."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=Path, required=True, help=ids_help)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--kv", choices=list(KV_TYPES), default="f16")
    parser.add_argument("--no-extra-bufts", dest="extra_bufts", action="store_false",
                        help="turn llama.cpp's weight repacking buffers off (on by default, as its users get them)")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                        help="flash attention off (f16 KV only: llama.cpp needs it for a quantized V cache); on the "
                             "CPU it decodes long contexts faster off")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def open_model(args: argparse.Namespace, n_ctx: int, logits_all: bool):
    """llama_cpp.Llama on args.model, KV stored as args.kv, batches of BATCH, args.threads threads, flash attention
    on unless --no-flash-attn (llama.cpp refuses a quantized V cache without it), weight repacking on unless
    --no-extra-bufts."""
    import llama_cpp

    if not args.extra_bufts:
        no_extra_buffers()
    kv = KV_TYPES[args.kv]
    return llama_cpp.Llama(model_path=str(args.model), n_ctx=n_ctx, n_batch=BATCH, n_ubatch=BATCH,
                           n_threads=args.threads, n_threads_batch=args.threads, type_k=kv, type_v=kv,
                           flash_attn=args.flash_attn, logits_all=logits_all, verbose=False)


def main() -> int:
    parser = peer_arguments("JSON list of prompt token ids")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    common.pin_threads(args.threads)
    import numpy as np
    import llama_cpp

    ids = json.loads(args.ids.read_text())
    rss_start = common.rss_bytes()
    llm = open_model(args, n_ctx=len(ids) + args.tokens + 8, logits_all=False)
    rss_loaded = common.rss_bytes()
    n_vocab = llm.n_vocab()

    def last_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    llm.eval(ids[:16])  # warm-up (first-call allocations), then start over
    llm.reset()  # the next eval removes every cached position from 0 on
    t0 = time.perf_counter()
    llm.eval(ids)
    token = last_token()
    t1 = time.perf_counter()
    tokens = [token]
    for _ in range(args.tokens):
        llm.eval([token])
        token = last_token()
        tokens.append(token)
    t2 = time.perf_counter()
    args.out.write_text(json.dumps({
        "system": f"llama.cpp KV {args.kv}", "prefill_s": t1 - t0, "decode_s": t2 - t1, "decoded": args.tokens,
        "tokens": tokens, "n_ctx": llm.n_ctx(), "flash_attn": args.flash_attn, "extra_bufts": args.extra_bufts,
        "threads": args.threads, "system_info": llama_cpp.llama_print_system_info().decode(),
        "kv_bytes": kv_bytes(llm, args.kv),
        "rss_start_bytes": rss_start, "rss_loaded_bytes": rss_loaded,
        "rss_end_bytes": common.rss_bytes(), "peak_rss_bytes": common.peak_rss_bytes(),
        "llama_cpp_version": llama_cpp.__version__, "machine": common.machine_info(args.threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
