"""`python -m benchmarks`: every suite it runs has a report section, unknown suites are refused, and setup installs
only what the chosen suites lack; the chats the recall suites replay are what make_chat makes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks.__main__ as runner
from benchmarks import common, report


def test_every_suite_has_a_module_and_a_report_section():
    assert set(runner.SUITES) == {name for name, _, _ in report.SECTIONS}
    for command in runner.SUITES.values():
        assert callable(importlib.import_module(command.split()[0]).main)
    assert set(runner.PEERS) <= set(runner.SUITES)


def test_unknown_suite_is_refused():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--no-setup", "decod"], capture_output=True, text=True,
                          cwd=common.ROOT)
    assert done.returncode == 2
    assert "unknown suite(s) decod" in done.stderr and "choose from decode" in done.stderr


def test_setup_installs_only_missing_peers(monkeypatch, tmp_path):
    (tmp_path / "kvpress" / "bin").mkdir(parents=True)
    (tmp_path / "kvpress" / "bin" / "python").touch()  # kvpress is there, llamacpp is not
    monkeypatch.setattr(common, "venv_python", lambda name: tmp_path / name / "bin" / "python")
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: object())  # the bench extra is installed
    calls = []
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    runner.setup(["kvpress", "estimate_accuracy"])
    assert calls == []
    runner.setup(["decode", "weights", "kvpress"])
    assert len(calls) == 1 and calls[0][-2:] == [str(common.ROOT / "benchmarks" / "peers" / "setup.sh"), "llamacpp"]


@pytest.mark.parametrize("missing", [["matplotlib"], []])
def test_setup_installs_the_bench_extra_when_missing(monkeypatch, missing):
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None if name in missing else object())
    calls = []
    monkeypatch.setattr(runner.subprocess, "run",
                        lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    runner.setup(["estimate_accuracy"])
    assert bool(calls) == bool(missing)
    if missing:
        assert calls[0][:4] == [sys.executable, "-m", "pip", "install"] and calls[0][-1].endswith("[bench]")


@pytest.mark.parametrize("name, book, seed, facts", [
    ("sense-200-turns.jsonl", "texts/sensesensibility.txt", 7, "sense"),
    ("heldout-200-turns.jsonl", "texts/prideprejudice.txt", 11, "heldout"),
])
def test_the_generated_chats_are_what_make_chat_makes(name, book, seed, facts):
    """The committed chats regenerate byte for byte, and each answer is in its telling turn, asked after it, and
    nowhere else in the chat (a passage that held it would answer the question for the model)."""
    from benchmarks import common, make_chat

    path = common.ROOT / "data" / "conversations" / name
    lines = make_chat.make(common.data_file(book), 200, seed, make_chat.FACT_SETS[facts])
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
    turns = [line["user"] for line in lines[1:]]
    for told, asked, answer in make_chat.FACT_SETS[facts]:
        where = [i for i, text in enumerate(turns) if answer.lower() in text.lower()]
        assert where == [turns.index(told)]
        assert turns.index(told) < turns.index(asked)


@pytest.mark.parametrize("name, book, seeds", [("heldout-austen", "prideprejudice", [5]),
                                              ("heldout2-austen", "prideprejudice", [9]),
                                              ("heldout3-austen", "prideprejudice", [13, 14]),
                                              ("dev-sense", "sensesensibility", [7, 8])])
def test_the_committed_passkeys_are_what_make_passkey_makes(smollm2_tokenizer, name, book, seeds):
    """The committed passkey cases (held-out, and the 60-case dev set) regenerate byte for byte, numbered in
    order; each prompt holds its key twice, in the key sentence only, near its depth, and its context is within
    a sentence (and the key sentence) of its length in tokens."""
    from benchmarks import make_passkey

    path = common.ROOT / "data" / "passkey" / f"{name}.jsonl"
    count = lambda text: len(smollm2_tokenizer.encode(text))  # noqa: E731
    cases = make_passkey.make(common.data_file(f"texts/{book}.txt").read_text(encoding="utf-8"), count, seeds)
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(case) + "\n" for case in cases)
    assert [case["id"] for case in cases] == list(range(30 * len(seeds)))
    assert len({case["answer"] for case in cases}) == len(cases)
    for case in cases:
        prompt, key = case["prompt"], case["answer"]
        sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert prompt.count(key) == 2 and prompt.count(sentence) == 1
        assert prompt.endswith(make_passkey.QUESTION) and prompt.startswith(make_passkey.INTRO)
        parts = make_passkey.sentences(prompt)  # the key sits at its depth counted in sentences, not characters
        at = parts.index(f"The pass key is {key}.")
        after = len(parts) - at - sum(len(make_passkey.sentences(text)) for text in (sentence, make_passkey.QUESTION))
        before = at - len(make_passkey.sentences(make_passkey.INTRO))
        assert abs(before / (before + after) - case["depth"]) < 0.05
        context = count(prompt[: prompt.rindex(make_passkey.QUESTION)])
        assert case["tokens"] - 150 < context <= case["tokens"] + 30  # the key sentence comes on top


def test_update_keeps_the_other_policies_rows():
    from benchmarks import passkey_after

    row = lambda policy, budget, hit: {"id": 0, "policy": policy, "budget": budget, "hit": hit}  # noqa: E731
    saved = {"policies": ["keydiff", "compactor"], "rows": [row("none", "full", True), row("keydiff", "1/4", True),
                                                          row("compactor", "1/4", False)]}
    new = {"policies": ["compactor"], "max_tokens": 10, "rows": [row("none", "full", True),
                                                                 row("compactor", "1/4", True)]}
    merged = passkey_after.merge(saved, new)
    assert merged["policies"] == ["keydiff", "compactor"] and merged["max_tokens"] == 10
    assert sorted((r["policy"], r["hit"]) for r in merged["rows"]) == [("compactor", True), ("keydiff", True),
                                                                      ("none", True)]
    with pytest.raises(SystemExit):
        passkey_after.merge(saved, {**new, "rows": [{**r, "id": 1} for r in new["rows"]]})


def _passkey_run(ids, fractions, ours, peer):
    """A saved passkey_after result: `ours` {(policy, f): hits}, `peer` {(press, f): hits} over cases `ids`."""
    row = lambda i, policy, budget, hit, recall=False: {"id": i, "policy": policy, "budget": budget,  # noqa: E731
                                                        "hit": hit, "recall": recall}
    rows = [row(i, "none", "full", k % 2 == 0) for k, i in enumerate(ids)]
    rows += [row(i, p, f"1/{f}", k < hits, recall) for (p, f), hits in ours.items() for k, i in enumerate(ids)
             for recall in (False, True)]
    peer_rows = [{"id": i, "press": "none", "budget": "full", "hit": True} for i in ids]
    peer_rows += [{"id": i, "press": press, "budget": f"1/{f}", "hit": k < hits}
                  for (press, f), hits in peer.items() for k, i in enumerate(ids)]
    return {"rows": rows, "policies": sorted({p for p, _ in ours}), "fractions": fractions, "cases": len(ids),
            "max_tokens": 10, "case_set": "heldout", "peers": {"kvpress": {"rows": peer_rows, "new_tokens": 8,
                                                                             "build": {
        "kvpress_version": "0", "transformers_version": "0", "attn_implementation": "sdpa", "dtype": "float32"}}}}


def test_pooled_passkey_draws_sum_recall_off_hits_at_the_shared_fractions():
    from benchmarks import passkey_after

    first = _passkey_run(range(4), [4, 8], {("compactor", 4): 2, ("compactor", 8): 1, ("keydiff", 4): 1},
                         {("A", 4): 3, ("A", 8): 0, ("B", 4): 1, ("B", 8): 1})
    second = _passkey_run(range(3), [4], {("compactor", 4): 3}, {("A", 4): 1, ("B", 4): 0})
    second["peers"]["kvpress"]["rows"][-1]["error"] = "RuntimeError: on CPU"  # B failed on one case: left out
    both = passkey_after.pooled([first, second])
    assert both["cases"] == 7 and both["fractions"] == [4]
    assert both["full"] == (2 + 2, 4 + 3)
    assert both["policies"] == {"compactor": [5]}  # keydiff ran in one draw only; recall-on rows not counted
    assert both["presses"] == {"A": [4]}


def test_the_second_heldout_section_pools_both_draws(tmp_path, monkeypatch):
    from benchmarks import passkey_after

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    second = {**_passkey_run(range(3), [4], {("compactor", 4): 3}, {("A", 4): 1}), "case_set": "heldout2"}
    assert "together" not in passkey_after.heldout_markdown(second)  # no first draw saved: only its own tables
    (tmp_path / "passkey_heldout.json").write_text(json.dumps(_passkey_run(range(4), [4, 8], {
        ("compactor", 4): 2, ("compactor", 8): 1}, {("A", 4): 3, ("A", 8): 0})))
    text = passkey_after.heldout_markdown(second)
    assert "Both held-out draws together (7 cases" in text and "`--cases` `heldout` and `heldout2`" in text
    assert "| kvbound `compactor`, alone | 5 |" in text and "| kvpress A | 4 |" in text
    # compactor finds cases 0, 1 of the first draw and 0-2 of the second; A finds 0-2 and 0: 1 and 2 apart
    assert "`compactor` against A at 1/4: 2 keys only `compactor` finds, 1 only the press; sign test p = 1.00" in text
    (tmp_path / "passkey_heldout2.json").write_text(json.dumps(second))
    third = {**_passkey_run(range(2), [4], {("compactor", 4): 0}, {("A", 4): 2}), "case_set": "heldout3"}
    text = passkey_after.heldout_markdown(third)  # the third draw pools with both before it
    assert "All 3 held-out draws together (9 cases" in text and "`--cases` `heldout`, `heldout2` and `heldout3`" in text
    assert "| kvbound `compactor`, alone | 5 |" in text and "| kvpress A | 6 |" in text
    assert "2 keys only `compactor` finds, 3 only the press" in text
    assert "together" not in passkey_after.heldout_markdown({**third, "case_set": "heldout"})  # the first draw


@pytest.mark.parametrize("a, b, p", [(0, 0, 1.0), (1, 1, 1.0), (5, 0, 0.0625), (0, 5, 0.0625), (1, 9, 22 / 1024),
                                     (9, 10, 1.0)])
def test_sign_test_is_the_exact_two_sided_binomial(a, b, p):
    from benchmarks import passkey_after

    assert passkey_after.sign_test(a, b) == pytest.approx(p)


def test_passkey_fractions_are_checked_before_anything_runs(tmp_path, monkeypatch):
    from benchmarks import passkey_after

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(passkey_after, "measure", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit):
        passkey_after.main(["--fractions", "1"])
    (tmp_path / "passkey_after.json").write_text(json.dumps(_passkey_run(range(2), [4, 8], {("compactor", 4): 1},
                                                                         {("A", 4): 1})))
    with pytest.raises(SystemExit):  # an update keeps the saved fractions
        passkey_after.main(["--update", "--max-tokens", "10", "--fractions", "4"])
    monkeypatch.setattr(passkey_after, "add_peers", lambda *a, **k: pytest.fail("peers run despite bad arguments"))
    with pytest.raises(SystemExit):  # so does adding peers
        passkey_after.main(["--peers-only", "--fractions", "8"])


def test_heldout_ppl_update_runs_only_the_named_policies(tmp_path, monkeypatch):
    """`heldout_ppl --update --policies compactor`: compactor and the full cache measured again, the other
    policies' saved rows kept, and a saved run of other lengths refused instead of mixed in."""
    from benchmarks import heldout_ppl

    row = lambda policy, ppl: {"offset": 0.0, "policy": policy, "ppl": ppl, "delta_ppl_pct": 0.0}  # noqa: E731
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    (tmp_path / "heldout_ppl.json").write_text(json.dumps({
        "tokens": 64, "offsets": [0.0], "policies": ["window", "compactor"], "fraction": 4, "text": "t",
        "rows": [row("full cache", 10.0), row("window", 11.0), row("compactor", 12.0)]}))
    ran = []

    def measure(tokens, offsets, policies):
        ran.append(policies)
        return {"tokens": tokens, "offsets": offsets, "policies": policies, "fraction": 4, "text": "t",
                "rows": [row("full cache", 10.5), row("compactor", 10.8)]}
    monkeypatch.setattr(heldout_ppl, "measure", measure)
    monkeypatch.setattr(common, "machine_info", lambda threads=1: {})
    assert heldout_ppl.main(["--tokens", "64", "--offsets", "0", "--update", "--policies", "compactor"]) == 0
    saved = json.loads((tmp_path / "heldout_ppl.json").read_text())
    assert ran == [["compactor"]] and saved["policies"] == ["window", "compactor"]
    assert sorted((r["policy"], r["ppl"]) for r in saved["rows"]) == [("compactor", 10.8), ("full cache", 10.5),
                                                                      ("window", 11.0)]
    with pytest.raises(SystemExit):
        heldout_ppl.main(["--tokens", "128", "--offsets", "0", "--update", "--policies", "compactor"])
    assert ran == [["compactor"]]


FAKE_PEER = """
import argparse, json, sys
p = argparse.ArgumentParser(); p.add_argument("--cases"); p.add_argument("--model"); p.add_argument("--out")
p.add_argument("--fractions", nargs="+"); p.add_argument("--presses", nargs="+", default=["P"])
p.add_argument("--seed", type=int, default=0); p.add_argument("--skip-full", action="store_true")
a = p.parse_args()
cases = json.load(open(a.cases))
if any(c["id"] == "bad" for c in cases):
    sys.exit(3)
runs = [("none", "full")] * (not a.skip_full) + [(p, f"1/{f}") for p in a.presses for f in a.fractions]
rows = [{"id": c["id"], "press": press, "budget": b, "hit": c["answer"] == "1" or c["id"] < a.seed}
        for c in cases for press, b in runs]
json.dump({"rows": rows, "missing": {}, "build": {"threads": 1, "shard": [c["id"] for c in cases], "seed": a.seed,
                                                  "per_case_seed": True}},
          open(a.out, "w"))
"""


@pytest.mark.parametrize("jobs", [1, 2, 3, 7])
def test_peer_shards_cover_every_case_once_in_case_order(monkeypatch, tmp_path, jobs):
    from benchmarks import passkey_after

    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    monkeypatch.setattr(passkey_after, "PEER", script)
    monkeypatch.setattr(common, "venv_python", lambda name: Path(sys.executable))
    chosen = [{"id": i, "context": [0] * n, "question": [1], "answer": str(i % 2)}
              for i, n in enumerate([30, 10, 50, 20, 40])]
    result = passkey_after.run_peer(chosen, tmp_path / "m.gguf", jobs, (4,))
    assert [(r["id"], r["press"]) for r in result["rows"]] == [(i, p) for i in range(5) for p in ("none", "P")]
    assert [r["hit"] for r in result["rows"] if r["press"] == "P"] == [False, True, False, True, False]
    assert result["build"]["jobs"] == min(jobs, 5)
    if jobs == 2:  # longest first, dealt in turn: 50, 30, 10 and 40, 20
        assert result["build"]["shard"] == [2, 0, 1]
    failed = passkey_after.run_peer(chosen + [{"id": "bad", "context": [0], "question": [1], "answer": "1"}],
                                    tmp_path / "m.gguf", jobs, (4,))
    assert failed == {"error": "kvpress_passkey.py exited with status 3"}


def test_peer_presses_run_alone_and_join_the_saved_rows(monkeypatch, tmp_path):
    """`--peers-only --peer-presses Q`: kvpress runs Q only; its rows join the saved rows of the other presses,
    which (the full cache's too) stay as they were, in case order."""
    from benchmarks import passkey_after

    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    monkeypatch.setattr(passkey_after, "PEER", script)
    monkeypatch.setattr(common, "venv_python", lambda name: Path(sys.executable))
    chosen = [{"id": i, "context": [0] * 3, "question": [1], "answer": str(i % 2)} for i in range(3)]
    saved = passkey_after.run_peer(chosen, tmp_path / "m.gguf", 1, (4,))
    for row in saved["rows"]:
        row["hit"] = "saved"
    new = passkey_after.run_peer(chosen, tmp_path / "m.gguf", 2, (4,), ["Q(P)"])
    assert {r["press"] for r in new["rows"]} == {"none", "Q(P)"}
    merged = passkey_after.merge_presses(saved, new, ["Q(P)"])
    assert [(r["id"], r["press"]) for r in merged["rows"]] == [(i, p) for i in range(3) for p in ("none", "P", "Q(P)")]
    assert [r["hit"] for r in merged["rows"] if r["press"] != "Q(P)"] == ["saved"] * 6
    with pytest.raises(SystemExit):
        passkey_after.main(["--peer-presses", "Q(P)"])  # only beside --peers-only


@pytest.mark.parametrize("saved_seed, presses, seed", [(None, ["CompactorPress"], 0), (None, ["KeyDiffPress"], None),
                                                       (0, ["KeyDiffPress"], 0), (1, ["KeyDiffPress"], 1),
                                                       (1, ["KeyRerotationPress(CompactorPress)"], None),
                                                       (0, ["CompactorPress"], 0)])
def test_merged_peer_rows_keep_a_seed_only_when_every_random_row_has_it(saved_seed, presses, seed):
    """The new rows draw a sketch per case from seed 0; the saved ones drew one sketch for every case."""
    from benchmarks import passkey_after

    rows = lambda names: [{"id": 0, "press": n, "budget": "1/4", "hit": True} for n in names]  # noqa: E731
    seeded = lambda s: {} if s is None else {"seed": s}  # noqa: E731
    saved = {"rows": rows(["none", "CompactorPress", "KeyDiffPress"]), "build": {"v": 1, **seeded(saved_seed)}}
    new = {"rows": rows(presses), "build": {"seed": 0, "per_case_seed": True}}
    merged = passkey_after.merge_presses(saved, new, presses)
    assert merged["build"].get("seed") == seed and merged["build"]["v"] == 1
    assert merged["build"].get("per_case_seed", False) == ("CompactorPress" in presses)
    saved["seed_rows"] = [{**row, "seed": 1} for row in rows(["CompactorPress"])]
    kept = passkey_after.merge_presses(saved, new, presses)["seed_rows"]  # only a press drawn the same way keeps its
    assert kept == ([] if "CompactorPress" in presses else saved["seed_rows"])  # other seeds


def test_peer_seeds_add_draws_of_the_random_presses_beside_the_saved_rows(monkeypatch, tmp_path):
    """`--peers-only --peer-presses CompactorPress --peer-seeds 1 2`: the random press runs again from each seed
    (no full-cache rows), its rows marked with their seed and kept apart from the saved ones, which every table
    still counts; the report gives each seed's hits and their mean, per run and over both held-out draws."""
    import kvbound
    import kvbound.loading
    from benchmarks import passkey_after

    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    monkeypatch.setattr(passkey_after, "PEER", script)
    monkeypatch.setattr(common, "venv_python", lambda name: Path(sys.executable))
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(kvbound, "load", lambda **kwargs: None)
    monkeypatch.setattr(kvbound.loading, "resolve_model", lambda: tmp_path / "m.gguf")
    chosen = [{"id": i, "context": [0] * 3, "question": [1], "answer": "0"} for i in range(4)]
    monkeypatch.setattr(passkey_after, "cases", lambda llm, max_tokens, kind: chosen)
    saved = _passkey_run(range(4), [4, 8], {("compactor", 4): 3}, {("CompactorPress", 4): 1, ("CompactorPress", 8): 0,
                                                                    ("KeyDiffPress", 4): 2, ("KeyDiffPress", 8): 2})
    (tmp_path / "passkey_heldout.json").write_text(json.dumps(saved))
    args = ["--cases", "heldout", "--max-tokens", "10", "--peers-only", "--peer-presses", "CompactorPress"]
    with pytest.raises(SystemExit):  # saved rows with one sketch for every case: not a draw like the others
        passkey_after.main([*args, "--peer-seeds", "1"])
    saved["peers"]["kvpress"]["build"].update(seed=0, per_case_seed=True)
    (tmp_path / "passkey_heldout.json").write_text(json.dumps(saved))
    assert passkey_after.main([*args, "--peer-seeds", "1", "3", "--fractions", "4"]) == 0
    result = json.loads((tmp_path / "passkey_heldout.json").read_text())
    peer = result["peers"]["kvpress"]
    assert peer["rows"] == saved["peers"]["kvpress"]["rows"]
    assert sorted({(r["press"], r["seed"], r["budget"]) for r in peer["seed_rows"]}) == [
        ("CompactorPress", 1, "1/4"), ("CompactorPress", 3, "1/4")]  # case i hits when i < seed
    assert passkey_after.seed_hits(peer, "CompactorPress", 4, 4) == {0: 1, 1: 1, 3: 3}
    assert passkey_after.seed_hits(peer, "CompactorPress", 8, 4) == {0: 0}
    assert "| CompactorPress | 1/4 | 0/4 |" in passkey_after.markdown(result)
    assert "CompactorPress at 1/4, seeds 0, 1, 3: 1, 1, 3 hits; mean 1.7" in \
        passkey_after.markdown(result)
    assert "CompactorPress 1 / 0 (seeds 0, 1, 3 at 1/4: 1, 1, 3)" in passkey_after.headlines(result)[-1]
    assert passkey_after.main([*args, "--peer-seeds", "3", "--fractions", "4"]) == 0  # a draw run again: replaced
    assert len(json.loads((tmp_path / "passkey_heldout.json").read_text())["peers"]["kvpress"]["seed_rows"]) == 8
    second = {**_passkey_run(range(2), [4], {("compactor", 4): 1}, {("CompactorPress", 4): 2}), "case_set": "heldout2"}
    second["peers"]["kvpress"]["build"].update(seed=0, per_case_seed=True)
    second["peers"]["kvpress"]["seed_rows"] = [{"id": i, "press": "CompactorPress", "budget": "1/4", "hit": True,
                                                "seed": s} for s in (1, 2) for i in range(2)]
    both = passkey_after.pooled([result, second])
    assert both["seeds"] == {"CompactorPress": {4: {0: 3, 1: 3}}}  # the seeds both runs drew from
    assert "mean 3.0" in passkey_after.heldout_markdown(second)
    for bad in (["--peer-seeds", "0"], ["--peer-seeds", "1", "--fractions", "2"]):  # the saved seed; no such run
        with pytest.raises(SystemExit):
            passkey_after.main([*args, *bad])
    with pytest.raises(SystemExit):  # KeyDiffPress has nothing random to draw again
        passkey_after.main([*args[:-1], "KeyDiffPress", "--peer-seeds", "1"])
    with pytest.raises(SystemExit):  # only beside --peers-only and --peer-presses
        passkey_after.main(["--cases", "heldout", "--peers-only", "--peer-seeds", "1"])


def test_each_case_draws_its_own_kvpress_sketch_and_a_run_repeats():
    """The peer seeds torch per case from --seed and the case id: one seed for every row would draw the same
    CompactorPress sketch for every case, and a run's hits would hang on that one draw."""
    from benchmarks.peers import kvpress_passkey

    seeds = [kvpress_passkey.row_seed(0, case) for case in range(30)]
    assert len(set(seeds)) == 30 and seeds == [kvpress_passkey.row_seed(0, case) for case in range(30)]
    assert kvpress_passkey.row_seed(1, 0) != seeds[0]
