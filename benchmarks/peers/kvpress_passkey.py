"""kvpress side of the passkey-after-compression benchmark; runs inside benchmarks/.venvs/kvpress. Started by
benchmarks/passkey_after.py, which gives it the token ids kvbound ran.

Per case, press and kept fraction 1/f (compression_ratio 1 - 1/f): prefill the context ids with the press active,
question-agnostic, then let kvpress's own pipeline (`generate_answer`) feed the question ids at
positions continuing from the context's length (from the kept length after KeyRerotationPress, as the pipeline
does) and greedy-decode 8 tokens over the compressed cache. Each press is built as kvpress's evaluation registry
builds it (evaluation/evaluate_registry.py). CompactorPress sketches the keys with an unseeded torch.randn; each
case's rows start from a seed made of `--seed` and the case id, so a run repeats, its split over processes does not
change a hit, and every case draws its own sketch (one seed for every row would draw the same sketch for every
case, and the whole run's hits would hang on that one draw).

    benchmarks/.venvs/kvpress/bin/python benchmarks/peers/kvpress_passkey.py --cases C.json --model M.gguf --out O.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import zlib
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

NEW_TOKENS = 8
SEED = 0  # of kvpress's random parts, with the case id (row_seed): hits depend on neither the shards nor the rows before
PRESSES = ("CompactorPress", "KeyDiffPress", "LagKVPress", "KVzipPress", "ExpectedAttentionPress", "TOVAPress",
           "StreamingLLMPress", "KnormPress", "SnapKVPress", "KeyRerotationPress(CompactorPress)")


def row_seed(seed: int, case_id) -> int:
    """torch's seed for a case's rows: its own draw of every random part, the same in every run from `seed`."""
    return zlib.crc32(f"{seed}/{case_id}".encode())


def press_classes(name: str) -> list[str]:
    """The kvpress classes a press name builds, outermost first: 'KeyRerotationPress(CompactorPress)' → both."""
    return name.rstrip(")").split("(")


def build_press(kvpress, name: str, ratio: float):
    """A press as kvpress's leaderboard runs it: ExpectedAttention head-wise (AdaKV) with epsilon 1e-2, the others
    with their defaults. `Wrapper(Press)` wraps one in another: KeyRerotationPress(CompactorPress) re-rotates the
    kept keys to positions 0..K-1, as kvbound stores them."""
    *wrappers, inner = press_classes(name)
    if inner == "ExpectedAttentionPress":
        press = kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio, epsilon=1e-2))
    else:
        press = getattr(kvpress, inner)(compression_ratio=ratio)
    for wrapper in reversed(wrappers):
        press = getattr(kvpress, wrapper)(press)
    return press


def kvzip_tokenizer_dir(tokenizer, model, workdir: Path) -> None:
    """KVzipPress reloads the tokenizer from `model.config.name_or_path` (a GGUF's folder holds none) and, when the
    tokenizer has a chat template, takes the template's prefix as part of the context. Our contexts are raw text,
    so it gets the tokenizer without the template: the pipeline's own treatment of a raw context (prefix "",
    suffix "\\n")."""
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(workdir))
    model.config.name_or_path = str(workdir)


def kept_tokens(model, cache) -> float:
    """Context tokens kept per layer and KV head, on average. Presses that choose per head or per layer (AdaKV,
    KVzip) leave the cache at full length and mask the evicted keys (kvpress's attention_patch)."""
    layers = model.model.layers
    masked = [getattr(layer.self_attn, "masked_key_indices", None) for layer in layers]
    evicted = sum(len(m[0]) for m in masked if m is not None)
    return cache.get_seq_length() - evicted / (len(layers) * model.config.num_key_value_heads)


def answer(pipe, press, context, question) -> tuple[str, float]:
    """kvpress's pipeline `_forward` for a prefill press and one question: (decoded text, kept context tokens).
    After a KeyRerotationPress the question continues from the kept length, as the pipeline feeds it."""
    import kvpress
    import transformers

    cache = transformers.DynamicCache()
    with press(pipe.model) if press is not None else contextlib.nullcontext():
        pipe.model.model(input_ids=context, past_key_values=cache)
    kept = kept_tokens(pipe.model, cache)
    length = cache.get_seq_length() if isinstance(press, kvpress.KeyRerotationPress) else context.shape[1]
    text = pipe.generate_answer(question_ids=question, cache=cache, context_length=length,
                                max_new_tokens=NEW_TOKENS)
    return text, kept


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=Path, required=True,
                        help='JSON [{"id", "context": [ids], "question": [ids], "answer"}]')
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--fractions", type=int, nargs="+", default=[4, 8], help="keep 1/f of the context")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    parser.add_argument("--seed", type=int, default=SEED,
                        help="with each case's id, torch's seed at the start of its rows (CompactorPress's sketch)")
    parser.add_argument("--skip-full", action="store_true", help="no full-cache row (another seed of the presses)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    import kvpress
    import transformers

    transformers.utils.logging.disable_progress_bar()

    cases = json.loads(args.cases.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.model.parent), gguf_file=args.model.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    version = metadata.version("kvpress")
    missing = {name: f"not in kvpress {version}" for name in args.presses
               if not all(hasattr(kvpress, part) for part in press_classes(name))}
    runs = [("none", 1)] * (not args.skip_full) + [(name, f) for name in args.presses if name not in missing
                                                   for f in args.fractions]

    rows = []
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode(), \
            common.progress(len(cases) * len(runs), "kvpress") as advance:
        kvzip_tokenizer_dir(tokenizer, model, Path(workdir))
        for case in cases:
            context = torch.tensor([case["context"]])  # (1, C)
            question = torch.tensor([case["question"]])  # (1, Q)
            for name, f in runs:
                press = build_press(kvpress, name, 1.0 - 1.0 / f) if name != "none" else None
                row = {"engine": "kvpress", "id": case["id"], "press": name,
                       "budget": "full" if press is None else f"1/{f}", "compression_ratio": 1.0 - 1.0 / f,
                       "context_tokens": context.shape[1], "press_config": repr(press) if press is not None else None}
                started = time.perf_counter()
                torch.manual_seed(row_seed(args.seed, case["id"]))  # CompactorPress's sketch: each case its own draw
                try:
                    text, kept = answer(pipe, press, context, question)
                    row.update(kept_context_tokens=round(kept, 1), hit=str(case["answer"]) in text, text=text)
                except Exception as exc:  # one press failing on this model or on CPU must not end the run
                    row["error"] = f"{type(exc).__name__}: {exc}"
                row["elapsed_s"] = round(time.perf_counter() - started, 2)
                rows.append(row)
                advance(note=f"{case['id']} {name} {row['budget']}: "
                             f"{row.get('error') or ('hit' if row['hit'] else 'miss')}")
    args.out.write_text(json.dumps({
        "rows": rows, "missing": missing, "new_tokens": NEW_TOKENS,
        "build": {"kvpress_version": version, "seed": args.seed, "per_case_seed": True,
                  "transformers_version": transformers.__version__,
                  "torch_version": torch.__version__, "attn_implementation": model.config._attn_implementation,
                  "dtype": str(model.dtype), "threads": torch.get_num_threads()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
