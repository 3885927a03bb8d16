"""A long conversation under a fixed KV budget: the scripted dev chat, looped until a target number of tokens has
passed through the model, greedy. Per turn: KV bytes and process RSS, for kvbound at fixed budgets against
transformers with a DynamicCache kept across turns (only the new tokens are fed), which grows until the
model's trained context is full; where that happens is recorded.

Each system runs in its own subprocess so its RSS is its own.

    python -m benchmarks.long_chat [--quick] [--target-tokens 100000] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks import common

SUITE = "long_chat"
SYSTEMS: dict[str, dict[str, Any]] = {  # kvbound: KV cache options as llm.chat() takes them; default weights
    "kvbound 16MiB turns+h2o": {"engine": "kvbound", "budget": "16MiB", "policy": "turns+h2o"},
    "kvbound 16MiB turns+h2o recent_turns=0": {"engine": "kvbound", "budget": "16MiB", "policy": "turns+h2o",
                                               "recent_turns": 0},
    "kvbound 64MiB turns+h2o": {"engine": "kvbound", "budget": "64MiB", "policy": "turns+h2o"},
    "kvbound 16MiB int8 turns+h2o": {"engine": "kvbound", "budget": "16MiB", "policy": "turns+h2o", "dtype": "int8"},
    "transformers DynamicCache": {"engine": "transformers"},
}


MAX_REFUSED_IN_A_ROW = 25


def script() -> tuple[str, list[dict[str, Any]]]:
    lines = common.read_jsonl(common.data_file("conversations/dev-200-turns.jsonl"))
    return lines[0]["system"], [line for line in lines[1:] if "user" in line]


def looped_turns(turns: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    lap = 0
    while True:
        for turn in turns:
            yield lap, turn
        lap += 1


def recall(text: str, turn: dict[str, Any]) -> bool | None:
    expect = turn.get("expect")
    return None if not expect else any(e.lower() in text.lower() for e in expect)


# -- workers (one per subprocess) ------------------------------------------------------------------------------
def run_kvbound(spec: dict[str, Any], target: int, max_new: int) -> dict[str, Any]:
    """A refused turn (KVBudgetExceeded: the pinned tokens do not fit) is recorded and the chat goes on with the
    next message, as a user would; the session stays usable because a failed turn is rolled back."""
    import warnings

    import kvbound

    # kvbound warns when KV use crosses 80% / 95% of the budget; under a fixed budget that is every turn here.
    warnings.filterwarnings("ignore", message=r"KV use", category=UserWarning)
    llm = kvbound.load(weights=spec.get("weights", "auto"), device="cpu", tune_allocator=True)  # as the CLI
    system, turns = script()
    chat = llm.chat(system=system, **{k: v for k, v in spec.items() if k not in ("engine", "weights")})
    passed, rows, refused, streak = 0, [], [], 0
    stopped = f"target of {target} tokens reached"
    started = time.perf_counter()
    for index, (lap, turn) in enumerate(looped_turns(turns)):
        if passed >= target:
            break
        try:
            reply = chat.send(turn["user"], temperature=0, max_new_tokens=max_new)
        except kvbound.KvboundError as exc:
            refused.append({"turn": index + 1, "tokens_passed": passed, "context_tokens": chat.context_tokens,
                            "kv_bytes": chat.cache.nbytes, "rss_bytes": common.rss_bytes(),
                            "error": f"{type(exc).__name__}: {exc}"})
            streak += 1
            if streak >= MAX_REFUSED_IN_A_ROW:
                stopped = f"stopped after {streak} refused turns in a row (turn {index + 1})"
                break
            continue
        streak = 0
        passed += reply.prompt_tokens + len(reply.token_ids)
        rows.append({"turn": index + 1, "lap": lap, "tokens_passed": passed, "context_tokens": reply.context_tokens,
                     "kv_bytes": reply.kv_bytes, "rss_bytes": common.rss_bytes(), "ttft_s": reply.ttft_s,
                     "decode_tok_s": reply.decode_tokens_per_s, "evicted": reply.receipt.get("evicted_tokens", 0),
                     "recall": recall(reply.text, turn), "reply_tokens": len(reply.token_ids)})
    return {"rows": rows, "refused": refused, "stopped": stopped, "elapsed_s": time.perf_counter() - started,
            "capacity_tokens": chat.cache.capacity, "kv_pool_bytes": chat.cache.pool.nbytes}


def run_transformers(spec: dict[str, Any], target: int, max_new: int) -> dict[str, Any]:
    import torch
    import transformers
    from kvbound.loading import resolve_model

    path = resolve_model()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    max_context = model.config.max_position_embeddings
    stop_ids = {tok.eos_token_id}
    if "<|im_end|>" in tok.get_vocab():  # the chat template's end of turn
        stop_ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
    system, turns = script()
    messages = [{"role": "system", "content": system}]
    cache = transformers.DynamicCache(config=model.config)
    kw = {common.hf_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    fed: list[int] = []
    passed, rows, stopped = 0, [], f"target of {target} tokens reached"
    started = time.perf_counter()
    with torch.inference_mode():
        for index, (lap, turn) in enumerate(looped_turns(turns)):
            if passed >= target:
                break
            messages.append({"role": "user", "content": turn["user"]})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            keep = 0
            for a, b in zip(ids, fed):
                if a != b:
                    break
                keep += 1
            if keep < len(fed):  # the template rewrote history: drop the cache past the common prefix
                cache.crop(keep)
                del fed[keep:]
            new = ids[keep:]
            if len(fed) + len(new) + max_new > max_context:
                stopped = (f"context full at turn {index + 1}: {len(fed)} tokens held + {len(new)} new + "
                           f"{max_new} to generate > {max_context} (the model's trained context); a DynamicCache "
                           "loop must stop or truncate and re-prefill here")
                break
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([new]), **kw)
            fed += new
            token = int(torch.argmax(out.logits[0, -1]))
            ttft = time.perf_counter() - t0
            reply = [token]
            t1 = time.perf_counter()
            while True:
                out = model(input_ids=torch.tensor([[token]]), **kw)
                fed.append(token)
                if token in stop_ids or len(reply) >= max_new:
                    break
                token = int(torch.argmax(out.logits[0, -1]))
                reply.append(token)
            decode_s = time.perf_counter() - t1
            said = [t for t in reply if t not in stop_ids]
            text = tok.decode(said, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": text})
            passed += len(new) + len(reply)
            rows.append({"turn": index + 1, "lap": lap, "tokens_passed": passed, "context_tokens": len(fed),
                         "kv_bytes": _dynamic_cache_bytes(cache), "rss_bytes": common.rss_bytes(), "ttft_s": ttft,
                         "decode_tok_s": (len(reply) - 1) / decode_s if len(reply) > 1 else 0.0, "evicted": 0,
                         "recall": recall(text, turn), "reply_tokens": len(reply)})
    return {"rows": rows, "stopped": stopped, "elapsed_s": time.perf_counter() - started,
            "capacity_tokens": max_context, "kv_pool_bytes": None}


def _dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def worker(name: str, target: int, max_new: int, out: Path) -> None:
    common.pin_threads()
    import torch

    torch.set_num_threads(common.THREADS)
    spec = SYSTEMS[name]
    baseline_rss = common.rss_bytes()
    result = (run_kvbound if spec["engine"] == "kvbound" else run_transformers)(spec, target, max_new)
    result.update(system=name, spec=spec, peak_rss_bytes=common.peak_rss_bytes(), rss_before_load=baseline_rss,
                  machine=common.machine_info())
    out.write_text(json.dumps(result, default=str))


# -- driver -----------------------------------------------------------------------------------------------------
def measure(target: int, max_new: int, systems: list[str]) -> dict[str, Any]:
    results = {}
    with common.progress(len(systems), "long_chat") as advance, tempfile.TemporaryDirectory() as tmp:
        for name in systems:
            out = Path(tmp) / "out.json"
            args = ["-m", "benchmarks.long_chat", "--worker", name, "--target-tokens", str(target),
                    "--max-new-tokens", str(max_new), "--out", str(out)]
            proc = common.run_python(sys.executable, args)
            if proc.returncode != 0 or not out.is_file():
                results[name] = {"system": name, "error": f"worker exited with status {proc.returncode}", "rows": []}
            else:
                results[name] = json.loads(out.read_text())
                out.unlink()
            rows = results[name]["rows"]
            advance(note=f"{name}: {len(rows)} turns, {rows[-1]['tokens_passed'] if rows else 0} tokens")
    return {"config": {"target_tokens": target, "max_new_tokens": max_new, "greedy": True,
                       "kvbound_weights": "default (int4/int8 kept from the GGUF, bf16 compute) unless a system says",
                       "transformers_dtype": "fp32", "conversation": "examples/dev-200-turns.jsonl, looped"},
            "systems": results}


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, r in result["systems"].items():
        rows = r.get("rows", [])
        if not rows:
            out.append({"system": name, "error": r.get("error", "no turns")})
            continue
        recalls = [row["recall"] for row in rows if row["recall"] is not None]
        out.append({
            "system": name, "turns": len(rows), "tokens_passed": rows[-1]["tokens_passed"],
            "max_context_tokens": max(row["context_tokens"] for row in rows),
            "kv_peak_bytes": max(row["kv_bytes"] for row in rows), "kv_final_bytes": rows[-1]["kv_bytes"],
            "rss_first_bytes": rows[0]["rss_bytes"], "rss_last_bytes": rows[-1]["rss_bytes"],
            "rss_peak_bytes": r.get("peak_rss_bytes"),
            "evicted_tokens": sum(row["evicted"] for row in rows),
            "median_ttft_s": sorted(row["ttft_s"] for row in rows)[len(rows) // 2],
            "median_decode_tok_s": sorted(row["decode_tok_s"] for row in rows)[len(rows) // 2],
            "recall": f"{sum(recalls)}/{len(recalls)}" if recalls else "—",
            "refused_turns": len(r.get("refused", [])),
            "capacity_tokens": r.get("capacity_tokens"),
            "stopped": r.get("stopped", ""),
        })
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, (ax_kv, ax_rss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in result["systems"].items():
        rows = r.get("rows", [])
        if not rows:
            continue
        x = [row["tokens_passed"] / 1000 for row in rows]
        ax_kv.plot(x, [row["kv_bytes"] / 2**20 for row in rows], label=name)
        ax_rss.plot(x, [row["rss_bytes"] / 2**20 for row in rows], label=name)
        refused = r.get("refused", [])
        if refused:
            ax_kv.scatter([f["tokens_passed"] / 1000 for f in refused], [f["kv_bytes"] / 2**20 for f in refused],
                          marker="x", color="red", zorder=3, label=f"{name}: refused turns")
        stopped = r.get("stopped", "")
        if not stopped.startswith("target"):
            label = "context full" if stopped.startswith("context full") else "stuck: every turn refused"
            ax_kv.annotate(label, (x[-1], rows[-1]["kv_bytes"] / 2**20), fontsize=8, xytext=(5, 6),
                           textcoords="offset points")
    ax_kv.set(xlabel="tokens through the model (thousands)", ylabel="KV cache (MiB)", title="KV cache per turn")
    ax_rss.set(xlabel="tokens through the model (thousands)", ylabel="process RSS (MiB)", title="process RSS per turn")
    for ax in (ax_kv, ax_rss):
        ax.grid(alpha=0.3)
    ax_kv.legend(fontsize=8)
    fig.suptitle(f"long chat, greedy, max {result['config']['max_new_tokens']} new tokens per turn, 1 thread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for s in summary(result):
        if "error" in s:
            rows.append([s["system"], s["error"]] + [None] * 9)
            continue
        rows.append([s["system"], s["turns"], s["refused_turns"], s["tokens_passed"], s["max_context_tokens"],
                     common.mib(s["kv_peak_bytes"]), common.mib(s["rss_first_bytes"]), common.mib(s["rss_last_bytes"]),
                     s["evicted_tokens"], round(s["median_decode_tok_s"], 2), s["recall"]])
    table = common.markdown_table(["system", "turns answered", "turns refused", "tokens through", "max KV tokens",
                                   "KV peak MiB", "RSS turn 1 MiB", "RSS last MiB", "evicted tokens",
                                   "median decode tok/s", "fact recall"], rows)
    stops = [f"- {s['system']}: {s['stopped']}" for s in summary(result) if "stopped" in s]
    for name, r in result["systems"].items():
        refused = r.get("refused", [])
        if refused:
            stops.append(f"- {name}: {len(refused)} turns refused, first at turn {refused[0]['turn']}: "
                         f"{refused[0]['error'][:300]}")
    note = ("Systems run one after another, each in its own process; decode tok/s here is only indicative "
            "(not interleaved; see the decode suite for speed). Fact recall counts the scripted recall questions "
            "reached within the run.")
    return "\n".join([table, "", *stops, "", note])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_chat", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="9k tokens (just past the model's 8192 context) instead of 100k")
    parser.add_argument("--target-tokens", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    target = args.target_tokens or (9_000 if args.quick else 100_000)  # quick: just past the 8192 context
    if args.worker:
        worker(args.worker, target, args.max_new_tokens, args.out)
        return 0
    common.pin_threads()
    result = measure(target, args.max_new_tokens, args.systems)
    result["summary"] = summary(result)
    png = plot(result, common.RESULTS / "long_chat.png")
    result["plot"] = str(png.relative_to(common.ROOT)) if png else None
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
