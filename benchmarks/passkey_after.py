"""Passkey retrieval with the question after compression: the context (filler with a 5-digit key hidden at depth
0.1 / 0.5 / 0.9) is prefilled into a KV cache of 1/4 or 1/8 of its tokens, evicting as it goes; only then does
"What is the pass key?" arrive, so a policy that scores tokens by the latest queries cannot know what to keep.
Greedy, 8 new tokens; a hit when the answer appears. The full cache is the ceiling. Default model, fp32 compute.

Each policy runs with recall off (the policy alone) and on (`generate(raw=True, recall="on")`: passages the cache
evicted are searched with the prompt's last sentences and come back before them; chat/passages.py).

Peer: NVIDIA kvpress on the same token ids, each press compressing the context before the question exists
(compression_ratio 1 - 1/f; benchmarks/peers/kvpress_passkey.py in its own venv). `--peers-only` adds its rows to
the saved results instead of running kvbound again; `--peer-jobs N` splits kvpress's cases over N one-thread
processes (its hits do not depend on the split).

    python -m benchmarks.passkey_after [--max-tokens 4000] [--policies window h2o snapkv tova keydiff compactor] [--peers-only]
    python -m benchmarks.passkey_after --cases austen --max-tokens 4200   # book text as filler: harder

`--cases austen` hides the key in Sense and Sensibility instead of the repeated "The grass is green" filler: every
filler token differs, so a scorer cannot keep the key just because it is the one sentence unlike the others.
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

SUITE = "passkey_after"
QUESTION = "What is the pass key?"
FRACTIONS = (4, 8)
CASES = {"classic": "passkey/dev-classic.jsonl", "austen": "passkey/dev-austen.jsonl",
         "sense": "passkey/dev-sense.jsonl", "heldout": "passkey/heldout-austen.jsonl",
         "heldout2": "passkey/heldout2-austen.jsonl", "heldout3": "passkey/heldout3-austen.jsonl"}
PEER = common.BENCH / "peers" / "kvpress_passkey.py"


def cases(llm, max_tokens: int, kind: str = "classic") -> list[dict[str, Any]]:
    out = []
    for case in common.read_jsonl(common.data_file(CASES[kind])):
        cut = case["prompt"].rindex(QUESTION)
        context = llm.tokenizer.encode(case["prompt"][:cut], add_special=True)
        question = llm.tokenizer.encode(case["prompt"][cut:])
        if len(context) + len(question) <= max_tokens:
            out.append({**case, "context": context, "question": question})
    return out


def answer(llm, case: dict[str, Any], tokens: int | None, policy: str) -> str:
    import torch
    from kvbound.config import CacheConfig
    from kvbound.engine.runner import prefill_chunk

    cache = llm.new_cache(CacheConfig(tokens=tokens, policy=policy) if tokens else CacheConfig())
    chunk = prefill_chunk(llm.runner.chunk, cache.capacity, cache.policy.evicts)  # what eviction can make room for
    try:
        llm.runner.prefill(case["context"], cache, chunk)  # compressed before the question exists
        logits = llm.runner.prefill(case["question"], cache, chunk)
        out = []
        for _ in range(8):
            token = int(torch.argmax(logits))
            out.append(token)
            logits = llm.runner.decode(token, cache)
        return llm.tokenizer.decode(out)
    finally:
        cache.free()


def answer_with_recall(llm, case: dict[str, Any], tokens: int, policy: str) -> tuple[str, dict[str, Any]]:
    from kvbound.config import CacheConfig

    reply = llm.generate(case["prompt"], raw=True, cache=CacheConfig(tokens=tokens, policy=policy), recall="on",
                         max_new_tokens=8, temperature=0.0)
    return reply.text, reply.recall


def run_peer(chosen: list[dict[str, Any]], model: Path, jobs: int = 1, fractions: tuple[int, ...] = FRACTIONS,
             presses: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
    """kvpress on the cases' token ids: {"build", "rows", ...} from benchmarks/peers/kvpress_passkey.py, or
    {"error"}. `jobs` > 1 splits the cases into that many one-thread processes side by side (hits and kept tokens
    do not depend on it; the rows' elapsed_s then do), longest cases dealt first so the shards end together.
    `presses`: only these (and the full cache); None: the peer script's list. `seed`: the presses' random parts
    from this seed instead of the script's own, and no full-cache rows (another draw of the same presses)."""
    python = common.venv_python("kvpress")
    if not python.is_file():
        return {"error": "peer not installed: run bash benchmarks/peers/setup.sh kvpress"}
    order = sorted(range(len(chosen)), key=lambda i: -len(chosen[i]["context"]))
    shards = [s for s in ([chosen[i] for i in order[j::jobs]] for j in range(jobs)) if s]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for j, shard in enumerate(shards):
            cases_file, out = Path(tmp) / f"cases{j}.json", Path(tmp) / f"out{j}.json"
            cases_file.write_text(json.dumps([{k: c[k] for k in ("id", "context", "question", "answer")}
                                              for c in shard]))
            procs.append((out, common.start_python(python, [
                str(PEER), "--cases", str(cases_file), "--model", str(model),
                "--fractions", *map(str, fractions), "--out", str(out),
                *(["--presses", *presses] if presses else []),
                *(["--seed", str(seed), "--skip-full"] if seed is not None else [])])))
        codes = [proc.wait() for _, proc in procs]
        if any(codes) or not all(out.is_file() for out, _ in procs):
            return {"error": f"kvpress_passkey.py exited with status {max(codes, key=abs)}"}
        parts = [json.loads(out.read_text()) for out, _ in procs]
    place = {c["id"]: i for i, c in enumerate(chosen)}
    rows = sorted((r for part in parts for r in part["rows"]), key=lambda r: place[r["id"]])  # stable: press order
    return {**parts[0], "rows": rows, "build": {**parts[0]["build"], "jobs": len(parts)}}


def saved_cases(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The cases of a saved result, tokenized again (token ids from our tokenizer, as `cases()`); SystemExit when
    they are no longer the saved ones."""
    import kvbound

    common.pin_threads()
    chosen = cases(kvbound.load(dtype="fp32"), result["max_tokens"], result.get("case_set", "classic"))
    ours = {r["id"] for r in result["rows"]}
    if {c["id"] for c in chosen} != ours:
        raise SystemExit(f"the cases up to {result['max_tokens']} tokens ({[c['id'] for c in chosen]}) are not "
                         f"those of the saved result ({sorted(ours)}); re-run the whole suite")
    return chosen


def add_peers(result: dict[str, Any], jobs: int = 1, presses: list[str] | None = None) -> dict[str, Any]:
    """The saved kvbound result with kvpress run on the same cases (token ids from our tokenizer, as `cases()`).
    `presses`: run only these and put their rows beside the saved ones of the other presses."""
    from kvbound.loading import resolve_model

    peer = run_peer(saved_cases(result), resolve_model(), jobs, tuple(result["fractions"]), presses)
    saved = result.get("peers", {}).get("kvpress", {})
    if presses and "error" not in peer and "rows" in saved:
        peer = merge_presses(saved, peer, presses)
    return {**result, "peers": {"kvpress": peer}}


def add_seeds(result: dict[str, Any], seeds: list[int], presses: list[str], jobs: int = 1,
              fractions: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The saved result with more draws of kvpress's random presses: `presses` run again from each of `seeds`
    (at `fractions`, default the saved ones), their rows, marked with their seed, kept apart from the main rows
    in peers.kvpress.seed_rows (a draw run again replaces its old rows)."""
    from kvbound.loading import resolve_model

    peer = result.get("peers", {}).get("kvpress", {})
    if "rows" not in peer or not peer.get("build", {}).get("per_case_seed"):
        raise SystemExit("the saved kvpress rows do not draw a sketch per case from a seed: run them again first "
                         f"(--peers-only --peer-presses {' '.join(presses)})")
    if peer["build"]["seed"] in seeds:
        raise SystemExit(f"seed {peer['build']['seed']} is the saved rows' own: give other seeds")
    if fixed := [p for p in presses if not _random(p)]:
        raise SystemExit(f"{', '.join(fixed)} has no random part: another seed gives the same hits")
    chosen, model = saved_cases(result), resolve_model()
    fractions = fractions or tuple(result["fractions"])
    new = []
    for seed in seeds:
        run = run_peer(chosen, model, jobs, fractions, presses, seed)
        if "error" in run:
            raise SystemExit(f"kvpress with seed {seed}: {run['error']}")
        new += [{**row, "seed": seed} for row in run["rows"]]
    redone = {(r["press"], r["seed"], r["budget"]) for r in new}
    kept = [r for r in peer.get("seed_rows", []) if (r["press"], r["seed"], r["budget"]) not in redone]
    return {**result, "peers": {"kvpress": {**peer, "seed_rows": kept + new}}}


def seed_hits(peer: dict[str, Any], press: str, fraction: int, cases: int) -> dict[int, int]:
    """{seed: hits} of a random press at 1/fraction: the main rows' seed and every other seed that ran on all
    `cases` cases without an error."""
    draws = {peer["build"]["seed"]: _peer_hits(peer, press, fraction)} if "seed" in peer.get("build", {}) else {}
    for seed in sorted({r["seed"] for r in peer.get("seed_rows", [])}):
        draws[seed] = _peer_hits(_drawn(peer, seed), press, fraction)
    return {seed: sum(ran) for seed, (ran, errors) in draws.items() if len(ran) == cases and not errors}


def seeds_line(press: str, fraction: int, hits: dict[int, int]) -> str:
    """'- CompactorPress at 1/4, seeds 0, 1, 2: 13, 15, 14 hits; mean 14.0', or '' for fewer than two seeds."""
    if len(hits) < 2:
        return ""
    mean = sum(hits.values()) / len(hits)
    return (f"- {press} at 1/{fraction}, seeds {', '.join(map(str, hits))}: "
            f"{', '.join(map(str, hits.values()))} hits; mean {mean:.1f}")


def merge_presses(saved: dict[str, Any], new: dict[str, Any], presses: list[str]) -> dict[str, Any]:
    """kvpress rows of `presses` from `new`, the saved rows of every other press (the full cache included): case
    order kept, each case's rows in the saved press order, then the new presses."""
    rows = [r for r in saved["rows"] if r["press"] not in presses] + [r for r in new["rows"] if r["press"] in presses]
    order = {case: i for i, case in enumerate(dict.fromkeys(r["id"] for r in saved["rows"]))}
    missing = {**{k: v for k, v in saved.get("missing", {}).items() if k not in presses}, **new.get("missing", {})}
    build, seeding = dict(saved["build"]), _seeding(new["build"])  # kept: every random press's rows had it
    if any(_random(r["press"]) for r in rows if r["press"] in presses) and _seeding(build) != seeding:
        for key in SEEDING:
            build.pop(key, None)
        if all(r["press"] in presses for r in rows if _random(r["press"])):
            build.update(seeding)
    merged = {**saved, "rows": sorted(rows, key=lambda r: order[r["id"]]), "missing": missing, "build": build}
    if "seed_rows" in saved and _seeding(saved["build"]) != seeding:  # other seeds of a press drawn another way
        merged["seed_rows"] = [r for r in saved["seed_rows"] if r["press"] not in presses]
    return merged


SEEDING = ("seed", "per_case_seed")  # a peer build's seeding: its seed, and whether each case drew its own sketch


def _seeding(build: dict[str, Any]) -> dict[str, Any]:
    return {key: build[key] for key in SEEDING if key in build} if "seed" in build else {}


def _random(press: str) -> bool:
    """Whether a press has a random part: CompactorPress sketches the keys with torch.randn."""
    return "CompactorPress" in press


def measure(max_tokens: int, policies: list[str], kind: str = "classic",
            peer: dict[str, Any] | None = None, peer_jobs: int = 1,
            fractions: tuple[int, ...] = FRACTIONS) -> dict[str, Any]:
    """kvbound's rows, and kvpress's: run after them, or `peer` (rows saved for the same cases) as given."""
    import kvbound
    from kvbound.loading import resolve_model

    common.pin_threads()
    llm = kvbound.load(dtype="fp32", tune_allocator=True)
    chosen = cases(llm, max_tokens, kind)
    rows = []
    with common.progress(len(chosen) * (1 + 2 * len(policies) * len(fractions)), SUITE) as advance:
        for case in chosen:
            n = len(case["context"]) + len(case["question"])
            configs = [("full", "none", None, False)] + [
                (f"1/{f}", p, n // f, recall) for p in policies for f in fractions for recall in (False, True)]
            for budget, policy, tokens, recall in configs:
                recalled: dict[str, Any] = {}
                if recall:
                    text, recalled = answer_with_recall(llm, case, tokens, policy)
                else:
                    text = answer(llm, case, tokens, policy)
                hit = str(case["answer"]) in text
                rows.append({"id": case["id"], "prompt_tokens": n, "depth": case["depth"], "budget": budget,
                             "policy": policy, "recall": recall, "kv_tokens": tokens or n, "hit": hit, "text": text,
                             "recalled": recalled})
                advance(note=f"{case['id']} {budget} {policy}{' +recall' if recall else ''}: "
                             f"{'hit' if hit else 'miss'}")
    del llm  # the peer runs after, in its own process: the two never share the 2 cores
    return {"rows": rows, "policies": policies, "fractions": list(fractions), "max_tokens": max_tokens,
            "cases": len(chosen), "case_set": kind, "model_dtype": "fp32",
            "peers": {"kvpress": peer if peer is not None else
                      run_peer(chosen, resolve_model(), peer_jobs, fractions)}}


def _hits_rows(rows: list[dict[str, Any]], policy: str, fraction: int, recall: bool = False) -> list[dict[str, Any]]:
    return [r for r in rows if r["policy"] == policy and r["budget"] == f"1/{fraction}"
            and r.get("recall", False) == recall]


def _hits(rows: list[dict[str, Any]], policy: str, fraction: int, recall: bool) -> list[bool]:
    return [r["hit"] for r in _hits_rows(rows, policy, fraction, recall)]


def _peer_rows(peer: dict[str, Any], press: str, fraction: int) -> list[dict[str, Any]]:
    return [r for r in peer["rows"] if r["press"] == press and r["budget"] == f"1/{fraction}"]


def _drawn(peer: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """The peer's rows drawn from `seed` ({"rows"}): its main rows for their own seed or None, else that seed's
    rows among its seed_rows."""
    if seed is None or seed == peer["build"].get("seed"):
        return peer
    return {"rows": [r for r in peer.get("seed_rows", []) if r["seed"] == seed]}


def _peer_hits(peer: dict[str, Any], press: str, fraction: int) -> tuple[list[bool], int]:
    """(hits of the cases a press ran at 1/fraction, how many cases it failed on)."""
    mine = _peer_rows(peer, press, fraction)
    ran = [r["hit"] for r in mine if "error" not in r]
    return ran, len(mine) - len(ran)


def _peer_cell(peer: dict[str, Any], press: str, fraction: int) -> str:
    ran, errors = _peer_hits(peer, press, fraction)
    if not ran:
        return "error"
    return f"{sum(ran)}/{len(ran)}" + (f" ({errors} errors)" if errors else "")


def peer_markdown(result: dict[str, Any]) -> str:
    """kvpress press × kept fraction, under the full-cache ceiling of each engine."""
    peer = result.get("peers", {}).get("kvpress")
    if peer is None:
        return ""
    if "error" in peer:
        return f"kvpress: {peer['error']}."
    fractions = result["fractions"]
    full = sum(r["hit"] for r in result["rows"] if r["budget"] == "full")
    peer_full = [r["hit"] for r in peer["rows"] if r["press"] == "none" and "error" not in r]
    table_rows = [["full cache, kvbound"] + [f"{full}/{result['cases']}"] * len(fractions),
                  ["full cache, kvpress"] + [f"{sum(peer_full)}/{len(peer_full)}"] * len(fractions)]
    presses = list(dict.fromkeys(r["press"] for r in peer["rows"] if r["press"] != "none"))
    table_rows += [[press] + [_peer_cell(peer, press, f) for f in fractions] for press in presses]
    table_rows += [[press, *[why] * len(fractions)] for press, why in peer.get("missing", {}).items()]
    table = common.markdown_table(["kvpress press"] + [f"KV 1/{f} of the context" for f in fractions], table_rows)
    build = peer["build"]
    configs = sorted({f"`{r['press_config']}`" for r in peer["rows"] if r["press"] == "ExpectedAttentionPress"
                      and "press_config" in r and r["budget"] == f"1/{fractions[0]}"})
    errors = sorted({f"- {r['press']}: {r['error']}" for r in peer["rows"] if "error" in r})
    kept = {f: [r["kept_context_tokens"] / r["context_tokens"] for r in peer["rows"]
                if r["budget"] == f"1/{f}" and "kept_context_tokens" in r] for f in fractions}
    share = ", ".join(f"{100 * sum(v) / len(v):.1f}% (1/{f})" for f, v in kept.items() if v)
    notes = (f"kvpress {build['kvpress_version']} (transformers {build['transformers_version']}, "
             f"{build['attn_implementation']}, {build['dtype'].removeprefix('torch.')}) on the same GGUF "
             f"(transformers dequantizes it) and the same token ids. Each press prefills the whole context in one "
             f"pass and compresses it to compression_ratio 1 − 1/f before the question exists (kvbound evicts while "
             f"it prefills, never holding more than its budget); kvpress's pipeline (`generate_answer`) then feeds "
             f"the question and decodes {peer['new_tokens']} tokens greedily. Presses as kvpress's evaluation "
             f"registry builds them (ExpectedAttentionPress as {', '.join(configs) or 'AdaKV with epsilon 1e-2'}; "
             f"KVzipPress with the tokenizer's chat template off, the context being raw text). kvpress keeps {share} "
             f"of the context per layer and KV head and puts the question and the answer on top; kvbound's budget "
             f"of 1/f of the prompt holds the question and the answer too. CompactorPress sketches the keys at "
             f"random: " + (f"each case draws its own sketch, seeded with {build['seed']} and the case id, so a "
                            f"run repeats." if build.get("per_case_seed") else
                            f"seeded with {build['seed']} for every row, so every case had the same sketch and the "
                            f"run's hits are one random draw." if "seed" in build else
                            "unseeded in this run, so its hits are one random draw."))
    draws = [line for press in presses if _random(press) for f in fractions
             if (line := seeds_line(press, f, seed_hits(peer, press, f, result["cases"])))]
    draws = ["", "The presses with a random part from other seeds too (`--peer-seeds`):", *draws] if draws else []
    return "\n".join([table, "", notes, *draws, *([""] + errors if errors else [])])


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    full = sum(r["hit"] for r in rows if r["budget"] == "full")
    recall = any(r.get("recall") for r in rows)
    header = ["policy"] + [f"KV 1/{f}{', recall ' + m if recall else ''}" for f in result["fractions"]
                           for m in (("off", "on") if recall else ("",))]
    table_rows = [["full cache"] + [f"{full}/{result['cases']}"] * (len(header) - 1)]
    for policy in result["policies"]:
        cells = []
        for f in result["fractions"]:
            for on in ((False, True) if recall else (False,)):
                hits = _hits(rows, policy, f, on)
                cells.append(f"{sum(hits)}/{len(hits)}")
        table_rows.append([policy] + cells)
    table = common.markdown_table(header, table_rows)
    return (f"{result['cases']} cases of `data/{CASES[result.get('case_set', 'classic')]}` up to {result['max_tokens']:,} tokens; "
            f"the question is fed after the context was compressed. Recall on: the prompt's evicted passages are "
            f"searched with its last sentences and the best come back before them, inside the same KV budget."
            f"\n\n{table}" + (f"\n\n{peer}" if (peer := peer_markdown(result)) else ""))


def headlines(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    full = sum(r["hit"] for r in rows if r["budget"] == "full")
    parts, recalled = [], []
    for policy in result["policies"]:
        hits = [sum(_hits(rows, policy, f, False)) for f in result["fractions"]]
        parts.append(f"{policy} {' / '.join(map(str, hits))}")
        on = [sum(_hits(rows, policy, f, True)) for f in result["fractions"]]
        if any(r.get("recall") for r in rows):
            recalled.append(f"{policy} {' / '.join(map(str, on))}")
    filler = {"austen": " (Austen filler)", "heldout": " (held-out Austen cases)",
              "heldout2": " (second held-out draw of Austen cases)",
              "heldout3": " (third held-out draw of Austen cases)"}.get(result.get("case_set"), "")
    budgets = " / ".join(f"1/{f}" for f in result["fractions"])
    lines = [f"Passkey{filler} with the question after compression, KV at {budgets} of the prompt, "
             f"{result['cases']} cases (full cache {full}): " + ", ".join(parts) + "."]
    if recalled:
        lines.append("The same with recall on: " + ", ".join(recalled) + ".")
    peer = result.get("peers", {}).get("kvpress")
    if peer and "error" not in peer:
        presses = dict.fromkeys(r["press"] for r in peer["rows"] if r["press"] != "none")
        peer_full = sum(r.get("hit", False) for r in peer["rows"] if r["press"] == "none")
        scores = [f"{p} " + " / ".join(str(sum(ran)) if ran else "error" for ran, _ in
                                       (_peer_hits(peer, p, f) for f in result["fractions"])) + _draws(peer, p, result)
                  for p in presses]
        lines.append(f"kvpress {peer['build']['kvpress_version']} on the same cases, KV at {budgets} of the context, "
                     f"question after compression (full cache {peer_full}): " + ", ".join(scores) + ".")
    return lines


def _draws(peer: dict[str, Any], press: str, result: dict[str, Any]) -> str:
    """' (seeds 0, 1, 2 at 1/4: 14, 20, 17)' for a random press drawn from several seeds, else ''."""
    parts = [f"seeds {', '.join(map(str, hits))} at 1/{f}: {', '.join(map(str, hits.values()))}"
             for f in result["fractions"] if _random(press)
             and len(hits := seed_hits(peer, press, f, result["cases"])) >= 2]
    return f" ({'; '.join(parts)})" if parts else ""


def pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Hits summed over several runs (draws of cases), recall off, at the fractions every run has: {"cases",
    "fractions", "full": (kvbound, kvpress), "policies": {policy: [hits per fraction]}, "presses": {press: [...]}}.
    A press that failed on some case, or is missing from a run, is left out."""
    fractions = [f for f in results[0]["fractions"] if all(f in r["fractions"] for r in results)]
    policies = [p for p in results[0]["policies"] if all(p in r["policies"] for r in results)]
    peers = [r.get("peers", {}).get("kvpress", {"error": "not run"}) for r in results]
    usable = all("error" not in peer for peer in peers)
    ran_everywhere = lambda press: all(len(_peer_hits(peer, press, f)[0]) == r["cases"]  # noqa: E731
                                       for peer, r in zip(peers, results) for f in fractions)
    presses = [press for press in dict.fromkeys(row["press"] for row in peers[0]["rows"])
               if press != "none" and ran_everywhere(press)] if usable else []
    peer_full = sum(row.get("hit", False) for peer in peers for row in peer["rows"] if row["press"] == "none") \
        if usable else None
    return {
        "cases": sum(r["cases"] for r in results), "fractions": fractions,
        "full": (sum(row["hit"] for r in results for row in r["rows"] if row["budget"] == "full"), peer_full),
        "policies": {p: [sum(sum(_hits(r["rows"], p, f, False)) for r in results) for f in fractions]
                     for p in policies},
        "presses": {press: [sum(sum(_peer_hits(peer, press, f)[0]) for peer in peers) for f in fractions]
                    for press in presses},
        "seeds": {press: draws for press in presses if _random(press)
                  if (draws := _pooled_seeds(peers, results, press, fractions))}}


def _pooled_seeds(peers: list[dict[str, Any]], results: list[dict[str, Any]], press: str,
                  fractions: list[int]) -> dict[int, dict[int, int]]:
    """{fraction: {seed: hits over every run}} for the seeds a random press ran from in every run (two or more)."""
    out = {}
    for f in fractions:
        per_run = [seed_hits(peer, press, f, r["cases"]) for peer, r in zip(peers, results)]
        shared = sorted(set.intersection(*(set(hits) for hits in per_run)))
        if len(shared) >= 2:
            out[f] = {seed: sum(hits[seed] for hits in per_run) for seed in shared}
    return out


HELDOUT = tuple(kind for kind in CASES if kind.startswith("heldout"))  # the held-out draws, in the order made


def heldout_markdown(result: dict[str, Any]) -> str:
    """A later held-out draw, then it and every draw made before it together (those from their saved results),
    with a case-by-case comparison of each policy and each press."""
    text = markdown(result)
    names = HELDOUT[:HELDOUT.index(result["case_set"])] if result.get("case_set") in HELDOUT else ()
    earlier = [(name, saved) for name in names if (saved := common.read_result(f"passkey_{name}")) is not None]
    if not earlier:
        return text
    runs = [saved for _, saved in earlier] + [result]
    together = pooled(runs)
    if not together["fractions"]:
        return text
    budgets = [f"KV 1/{f}" for f in together["fractions"]]
    rows = [["full cache, kvbound", *[str(together["full"][0])] * len(budgets)]]
    if together["full"][1] is not None:
        rows.append(["full cache, kvpress", *[str(together["full"][1])] * len(budgets)])
    rows += [[f"kvbound `{p}`, alone", *map(str, hits)] for p, hits in together["policies"].items()]
    rows += [[f"kvpress {press}", *map(str, hits)] for press, hits in together["presses"].items()]
    draws = [seeds_line(press, f, hits) for press, per_fraction in together["seeds"].items()
             for f, hits in per_fraction.items()]
    shown = [f"`{name}`" for name in [*(name for name, _ in earlier), result["case_set"]]]
    flags = f"`--cases` {', '.join(shown[:-1])} and {shown[-1]}"
    which = "Both held-out draws" if len(runs) == 2 else f"All {len(runs)} held-out draws"
    return (f"{text}\n\n{which} together ({together['cases']} cases in Pride and Prejudice, {flags}), hits with "
            f"recall off:\n\n{common.markdown_table(['', *budgets], rows)}"
            + (f"\n\nThe random presses over several seeds, {which.lower()} together:\n" + "\n".join(draws)
               if draws else "")
            + (f"\n\n{by_case}" if (by_case := paired_markdown(runs, together)) else ""))


def paired(results: list[dict[str, Any]], policy: str, press: str, fraction: int,
           seed: int | None = None) -> tuple[int, int]:
    """(cases `policy` alone finds and `press` misses, cases `press` finds and `policy` alone misses), recall off,
    over the runs; `seed`: that seed's rows of a random press (None: its main rows)."""
    mine = theirs = 0
    for r in results:
        ours = {row["id"]: row["hit"] for row in _hits_rows(r["rows"], policy, fraction)}
        for row in _peer_rows(_drawn(r["peers"]["kvpress"], seed), press, fraction):
            if "error" not in row:
                mine += ours[row["id"]] and not row["hit"]
                theirs += row["hit"] and not ours[row["id"]]
    return mine, theirs


def sign_test(a: int, b: int) -> float:
    """Exact two-sided sign test of a against b discordant cases (the chance of a split at least this uneven
    if either side were as likely to win each case)."""
    n = a + b
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2 ** n)


def _p(p: float) -> str:
    return f"p = {p:.2f}" if p >= 0.01 else "p < 0.01"


def paired_markdown(results: list[dict[str, Any]], together: dict[str, Any]) -> str:
    """Each policy against each press, case by case: the cases only one of them finds, and a sign test."""
    lines = []
    for f in together["fractions"]:
        for policy in together["policies"]:
            for press in together["presses"]:
                seeds = list(together["seeds"].get(press, {}).get(f, {})) or [None]
                for seed in seeds:
                    mine, theirs = paired(results, policy, press, f, seed)
                    drawn = f", seed {seed}" if seed is not None else ""
                    lines.append(f"- `{policy}` against {press}{drawn} at 1/{f}: {mine} keys only `{policy}` "
                                 f"finds, {theirs} only the press; sign test {_p(sign_test(mine, theirs))}")
    return "Case by case (recall off; p: exact two-sided sign test on the cases only one side finds):\n" + \
        "\n".join(lines) if lines else ""


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` (some policies run again, and the full cache) over `saved`: the saved rows of the other policies stay."""
    if {r["id"] for r in saved["rows"]} != {r["id"] for r in new["rows"]}:
        raise SystemExit("the saved results hold other cases: run the whole suite")
    return common.merge_policies(saved, new, baseline="none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="prompts up to 2,000 tokens")
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--policies", nargs="+", default=["window", "h2o", "snapkv", "tova", "keydiff", "compactor"])
    parser.add_argument("--cases", choices=sorted(CASES), default="classic",
                        help="the case set: classic filler, austen (Sense and Sensibility as filler; results "
                             "passkey_austen), sense (60 dev cases in Sense and Sensibility, benchmarks/make_passkey.py; "
                             "results passkey_sense), heldout (30 cases in Pride and Prejudice; results "
                             "passkey_heldout), heldout2 (30 more in it, another seed; results passkey_heldout2) or heldout3 (60 "
                             "more, two other seeds; results passkey_heldout3)")
    parser.add_argument("--fractions", type=int, nargs="+",
                        help="keep 1/f of the prompt for each f given (kvpress runs the same fractions; default 4 8, "
                             "or the saved run's with --update, --reuse-peers and --peers-only, which keep them)")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="keep the saved kvpress rows (same cases) instead of running kvpress again")
    parser.add_argument("--update", action="store_true",
                        help="run only --policies (and the full cache) again; keep the saved rows of the other "
                             "policies and the saved kvpress rows (same cases)")
    parser.add_argument("--peers-only", action="store_true",
                        help="run kvpress on the cases of the saved results and add its rows there")
    parser.add_argument("--peer-presses", nargs="+", metavar="PRESS",
                        help="with --peers-only: run only these kvpress presses and keep the saved rows of the "
                             "others, e.g. 'KeyRerotationPress(CompactorPress)'")
    parser.add_argument("--peer-seeds", type=int, nargs="+", metavar="SEED",
                        help="with --peers-only and --peer-presses (presses with a random part, e.g. CompactorPress): "
                             "run them again from each of these seeds, more draws beside the saved ones; --fractions "
                             "may then be some of the saved run's")
    parser.add_argument("--peer-jobs", type=int, default=1,
                        help="run kvpress as this many one-thread processes side by side, each on a share of the "
                             "cases (accuracy only: use the machine's cores for a long peer run)")
    args = parser.parse_args(argv)
    if args.peer_jobs < 1:
        parser.error(f"--peer-jobs must be at least 1, got {args.peer_jobs}")
    if args.peer_presses and not args.peers_only:
        parser.error("--peer-presses adds presses to saved results: use it with --peers-only")
    if args.peer_seeds and not (args.peers_only and args.peer_presses):
        parser.error("--peer-seeds draws the random presses again: use it with --peers-only and --peer-presses")
    if args.fractions and any(f < 2 for f in args.fractions):
        parser.error(f"--fractions keeps 1/f of the prompt: each f must be at least 2, got {args.fractions}")
    name = SUITE if args.cases == "classic" else f"passkey_{args.cases}"
    keeps_saved = args.update or args.reuse_peers or args.peers_only
    saved = (common.read_result(name) or {}) if keeps_saved else {}
    if args.peer_seeds and saved and args.fractions and not set(args.fractions) <= set(saved.get("fractions", [])):
        parser.error(f"benchmarks/results/{name}.json was run at fractions "
                     f"{' '.join(map(str, saved.get('fractions', [])))}: --peer-seeds draws at some of them")
    elif saved and args.fractions and not args.peer_seeds and \
            list(dict.fromkeys(args.fractions)) != saved.get("fractions"):
        kept = " ".join(map(str, saved.get("fractions", [])))
        parser.error(f"benchmarks/results/{name}.json was run at fractions {kept}; --update, --reuse-peers and "
                     f"--peers-only keep them: leave out --fractions or pass --fractions {kept}")
    if args.peers_only:
        if not saved:
            parser.error(f"no benchmarks/results/{name}.json to add the peers to: run the suite first")
        result = (add_seeds(saved, args.peer_seeds, args.peer_presses, args.peer_jobs,
                            tuple(dict.fromkeys(args.fractions)) if args.fractions else None)
                  if args.peer_seeds else add_peers(saved, args.peer_jobs, args.peer_presses))
        common.rewrite_result(name, result)
        print(markdown(result))
        return 0
    max_tokens = 2000 if args.quick else args.max_tokens
    peer = None
    if args.update or args.reuse_peers:  # an update keeps the saved kvpress rows too
        if saved.get("max_tokens") != max_tokens or "kvpress" not in saved.get("peers", {}):
            parser.error(f"benchmarks/results/{name}.json has no kvpress rows for prompts up to {max_tokens} tokens")
        peer = saved["peers"]["kvpress"]
    fractions = tuple(dict.fromkeys(args.fractions or saved.get("fractions", FRACTIONS)))
    result = measure(max_tokens, args.policies, args.cases, peer, args.peer_jobs, fractions)
    return common.finish(name, merge(saved, result) if args.update else result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())
