"""kvpress side of the prefill-compression comparison; runs inside benchmarks/.venvs/kvpress (kvpress 0.5.x,
transformers < 5.3, torch CPU). Started by benchmarks/compression.py, which runs kvbound on the same token ids.

Protocol, per press and compression ratio r: prefill the context (C tokens) in one forward pass with the press
active (kvpress compresses it question-agnostically, keeping C*(1-r) tokens per layer and head), then score the
next S tokens in one forward pass over the compressed cache, positions continuing at C (as kvpress's pipeline
does for a question). The prefill's own last logits are not scored: they saw the uncompressed context.

    benchmarks/.venvs/kvpress/bin/python benchmarks/peers/kvpress_ppl.py --ids IDS.json --model M.gguf --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import common  # noqa: E402

PRESSES = ("StreamingLLMPress", "SnapKVPress", "TOVAPress", "KeyDiffPress", "CompactorPress", "KnormPress",
           "ExpectedAttentionPress")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=Path, required=True, help='JSON {"context": [...], "continuation": [...]}')
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--fractions", type=int, nargs="+", default=[2, 4, 8], help="keep 1/f of the context")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    import kvpress
    import transformers

    ids = json.loads(args.ids.read_text())
    context = torch.tensor([ids["context"]])  # (1, C)
    continuation = torch.tensor([ids["continuation"]])  # (1, S+1)
    C, S = context.shape[1], continuation.shape[1] - 1
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.model.parent), gguf_file=args.model.name, dtype=torch.float32).eval()

    runs = [("none", 0.0)] + [(p, 1.0 - 1.0 / f) for p in args.presses for f in args.fractions]
    rows = []
    with common.progress(len(runs), "kvpress") as advance, torch.inference_mode():
        for press_name, ratio in runs:
            started = time.perf_counter()
            cache = transformers.DynamicCache()
            press = getattr(kvpress, press_name)(compression_ratio=ratio) if press_name != "none" else None
            try:
                if press is None:
                    model.model(input_ids=context, past_key_values=cache)
                else:
                    with press(model):
                        model.model(input_ids=context, past_key_values=cache)
                kept = cache.get_seq_length()
                positions = torch.arange(C, C + S)[None]  # (1, S)
                out = model(input_ids=continuation[:, :-1], past_key_values=cache, position_ids=positions)
                logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # (S, V)
                nll = -float(logp.gather(1, continuation[0, 1:, None]).mean())
                rows.append({"engine": "kvpress", "method": press_name, "compression_ratio": ratio,
                             "context_tokens": C, "kept_context_tokens": kept, "scored_tokens": S,
                             "nll": nll, "ppl": math.exp(nll), "elapsed_s": time.perf_counter() - started})
                note = f"{press_name} r={ratio:.3f}: ppl {math.exp(nll):.3f}"
            except Exception as exc:  # one press failing on this model/version must not end the run
                rows.append({"engine": "kvpress", "method": press_name, "compression_ratio": ratio,
                             "error": f"{type(exc).__name__}: {exc}"})
                note = f"{press_name}: {type(exc).__name__}"
            advance(note=note)
    args.out.write_text(json.dumps({"rows": rows, "machine": common.machine_info(),
                                    "kvpress_version": kvpress.__version__ if hasattr(kvpress, "__version__") else None,
                                    "transformers_version": transformers.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
