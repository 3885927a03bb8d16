"""The `kvbound` command as a user runs it: a subprocess, the real default model, exit codes and output streams.

Bad-input cases load no model; they run side by side (one fixture, a thread pool) because each pays ~1.5 s of
interpreter + torch start-up, and are then checked one test each.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers_gguf import truncate, write_garbage, write_gguf

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dev-200-turns.jsonl"
BOOK = ROOT / "data" / "texts" / "prideprejudice.txt"
TURN_FIELDS = {"turn", "prompt_tokens", "reply_tokens", "context_tokens", "kv_bytes", "rss_bytes", "elapsed_s",
               "reply"}


def kvbound(*args: str | Path, cwd: Path | None = None, stdin: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvbound", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=stdin, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one `error:` line on stderr that mentions each needle, no traceback."""
    context = f"stdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stderr + result.stdout, context
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    for needle in needles:
        assert needle.lower() in lines[0].lower(), context


# -- the model at work --------------------------------------------------------------------------------------------
@pytest.mark.model
def test_generate_json_greedy(smollm2_tokenizer) -> None:
    result = kvbound("generate", "--prompt", "What is the capital of France?", "--greedy", "--max-tokens", "12",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    reply = json.loads(lines[0])
    for key in ("text", "token_ids", "prompt_tokens", "kv_bytes", "elapsed_s", "finish_reason", "context_tokens",
                "ttft_s", "decode_tokens_per_s"):
        assert key in reply, key
    assert 1 <= len(reply["token_ids"]) <= 12
    assert smollm2_tokenizer.decode(reply["token_ids"], skip_special=True).strip()
    assert reply["text"].strip()
    assert reply["finish_reason"] in ("stop", "length")
    assert reply["context_tokens"] >= reply["prompt_tokens"] > 0
    assert reply["kv_bytes"] > 0 and reply["elapsed_s"] > 0


@pytest.mark.model
def test_generate_json_logprobs() -> None:
    """Greedy: each token is its step's likeliest, with the top alternatives sorted, and the tokens spell the text."""
    result = kvbound("generate", "--prompt", "Name a colour.", "--greedy", "--max-tokens", "8", "--json",
                     "--logprobs", "3")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    entries = reply["logprobs"]
    assert entries and len(entries) <= len(reply["token_ids"])
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["token_id"] == top[0]["token_id"] and entry["logprob"] == pytest.approx(top[0]["logprob"])
        assert entry["logprob"] <= 0
    assert "".join(e["token"] for e in entries).strip() == reply["text"].strip()


@pytest.mark.model
def test_converse_reuses_the_cache_across_turns() -> None:
    result = kvbound("converse", "--script", SCRIPT, "--turns", "4", "--max-new-tokens", "16", "--greedy", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    turns, summary = records[:-1], records[-1]["summary"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    for t in turns:
        assert TURN_FIELDS <= set(t), t
        assert 1 <= t["reply_tokens"] <= 16 and t["rss_bytes"] > 0
    contexts = [t["context_tokens"] for t in turns]
    assert contexts == sorted(contexts) and len(set(contexts)) == 4
    # Turn 2 feeds only its new message: far fewer tokens than the context it continues (no re-prefill).
    assert turns[1]["prompt_tokens"] * 5 < turns[1]["context_tokens"]
    assert all(t["reprefilled_tokens"] == 0 for t in turns)
    assert "recalled" not in turns[0]  # only turns that carry `expect` report a recall
    assert summary["turns"] == 4 and summary["stopped"] == "turn_limit"
    assert summary["peak_rss_bytes"] == max(t["rss_bytes"] for t in turns)


@pytest.mark.model
def test_converse_ends_cleanly_when_the_context_is_full(tmp_path: Path) -> None:
    passage = BOOK.read_text(encoding="utf-8")[20_000:21_500]
    script = tmp_path / "long.jsonl"
    script.write_text("\n".join(json.dumps(line) for line in (
        {"system": "Be brief."}, {"user": f"Summarize:\n\n{passage}"}, {"user": "Remember 4411.", "expect": ["4411"]},
        {"user": f"And this:\n\n{passage}"})) + "\n")
    result = kvbound("converse", "--script", script, "--context", "600", "--max-new-tokens", "4", "--greedy")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "context full at turn 3" in result.stderr and "bounded-cache flags" in result.stderr
    # what this checks: the run stops cleanly after 2 turns and counts the one question asked (whether the model
    # answered it is the recall suite's business, not this test's)
    assert re.search(r"summary: 2 turns · recalled [01]/1", result.stdout), result.stdout


@pytest.mark.model
def test_info_json() -> None:
    result = kvbound("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["arch"] == "llama" and info["max_context"] == 8192 and info["layers"] == 30
    # The default keeps the GGUF's 4-bit matrices quantized and computes (and stores KV) in bf16.
    assert info["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads, dim 64, bf16
    assert info["weights_storage"] == {"int4": 120, "int8": 1} and info["weights_bytes"] < 100e6
    assert 130e6 < info["parameters"] < 140e6
    assert info["file_tensor_types"].get("Q4_1", 0) > 0


@pytest.mark.model
def test_chat_reads_stdin_resets_and_exits() -> None:
    result = kvbound("chat", "--greedy", "--max-tokens", "6", stdin="Say hello.\n/reset\nSay hello.\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.count("tokens in context") == 2
    assert "conversation forgotten" in result.stdout
    first, second = [line for line in result.stdout.splitlines() if "tokens in context" in line]
    assert first.split(" tokens")[0] == second.split(" tokens")[0]  # after /reset the same turn costs the same


@pytest.mark.model
def test_chat_memory_command_and_unknown_commands_stay_out_of_the_conversation() -> None:
    result = kvbound("chat", "--greedy", "--max-tokens", "6", stdin="/memory\n/nosuch\nSay hello.\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "KV used / reserved:" in result.stdout and "archive of evicted turns" in result.stdout
    assert "unknown command /nosuch" in result.stdout
    assert result.stdout.count("tokens in context") == 1  # only "Say hello." went to the model


@pytest.mark.model
def test_chat_set_save_load_multiline_and_bye(tmp_path: Path) -> None:
    """/set changes sampling and the policy, /save and /load carry the session over, a quoted block is one
    message, bad /set values are one error line, and the budget's rounding to whole blocks is shown."""
    script = "\n".join([
        "My name is Ada.", "/set max_tokens 3", "/set temperature hot", "/set colour blue", '"""', "Line one.",
        "Line two.", '"""', "/save saved.kvb", "/reset", "/load saved.kvb", "/set policy window", "/set policy nosuch",
        "/load nowhere.kvb", "Say hi.", "/bye", "Never sent."]) + "\n"
    result = kvbound("chat", "--greedy", "--max-tokens", "8", "--kv-budget", "8MiB", "--policy", "turns",
                     cwd=tmp_path, stdin=script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "KV budget 8.0 MiB → 7.7 MiB usable, 352 tokens (whole blocks of 32 tokens" in result.stdout, result.stdout
    assert "max_tokens = 3" in result.stdout
    assert "/set temperature needs a number, got 'hot'" in result.stderr
    assert "/set takes one of temperature" in result.stderr
    assert "no such file" in result.stderr and "nowhere.kvb" in result.stderr
    assert "nosuch" in result.stderr and "window" in result.stderr  # an unknown policy lists the known ones
    assert (tmp_path / "saved.kvb").stat().st_size > 0
    assert "loaded 2 turns from saved.kvb" in result.stdout
    assert "policy = window; the conversation was rebuilt" in result.stdout
    statuses = [line for line in result.stdout.splitlines() if "tokens in context" in line]
    assert len(statuses) == 3  # Ada, the two-line block, "Say hi." ; nothing after /bye
    assert all("+ 3 reply tokens" in line or "+ 2 reply tokens" in line or "+ 1 reply tokens" in line
               for line in statuses[1:]), statuses  # /set max_tokens 3 held


@pytest.mark.model
def test_prompt_longer_than_the_context(tmp_path: Path) -> None:
    prompt = tmp_path / "long.txt"
    prompt.write_text(BOOK.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    assert_user_error(kvbound("generate", "--prompt-file", prompt, "--max-tokens", "4"), "8,192", "shorten the prompt")


# -- bad input: each case exits 2 with one readable line ------------------------------------------------------------
SCRIPTS = {
    "not_json.jsonl": '{"system": "s"}\nthis is not json\n',
    "no_system.jsonl": '{"user": "hi"}\n',
    "no_user.jsonl": '{"system": "s"}\n{"user": "hi"}\n{"expect": ["x"]}\n',
    "empty.jsonl": "",
}
BAD_INPUT: dict[str, tuple[list[str], tuple[str, ...]]] = {
    # case: (arguments, words the error line must contain)
    "negative_max_tokens": (["generate", "-p", "hi", "--max-tokens", "-3"], ("--max-tokens",)),
    "negative_temperature": (["generate", "-p", "hi", "--temperature", "-0.5"], ("--temperature", ">= 0")),
    "top_p_zero": (["generate", "-p", "hi", "--top-p", "0"], ("--top-p", "(0, 1]")),
    "unknown_dtype": (["generate", "-p", "hi", "--dtype", "fp8"], ("--dtype", "fp32")),
    "unknown_device": (["generate", "-p", "hi", "--device", "tpu"], ("tpu", "cpu")),
    "greedy_and_temperature": (["generate", "-p", "hi", "--greedy", "--temperature", "0.9"], ("--greedy",)),
    "empty_prompt": (["generate", "-p", "  "], ("empty",)),
    "no_prompt": (["generate"], ("--prompt",)),
    "missing_prompt_file": (["generate", "--prompt-file", "nowhere.txt"], ("nowhere.txt",)),
    "missing_model_file": (["generate", "-p", "hi", "--model", "missing/model.gguf"], ("missing/model.gguf",)),
    "unknown_model_name": (["info", "tinyllama"], ("tinyllama", "smollm2-135m")),
    "unsupported_arch": (["generate", "-p", "hi", "--model", "gpt2.gguf"], ("gpt2", "not supported")),
    "truncated_model": (["info", "truncated.gguf"], ("truncated",)),
    "corrupt_model": (["info", "garbage.gguf"], ("garbage.gguf", "corrupt")),
    "pull_unknown": (["pull", "tinyllama"], ("tinyllama", "smollm2-135m")),
    "script_missing": (["converse", "--script", "nowhere.jsonl"], ("nowhere.jsonl",)),
    "script_not_json": (["converse", "--script", "not_json.jsonl"], ("line 2", "not JSON")),
    "script_no_system": (["converse", "--script", "no_system.jsonl"], ("line 1", "system")),
    "script_line_without_user": (["converse", "--script", "no_user.jsonl"], ("line 3", '"user"')),
    "script_empty": (["converse", "--script", "empty.jsonl"], ("empty",)),
    "chat_bad_budget": (["chat", "--kv-budget", "abc"], ("abc",)),  # refused before the model loads
    "logprobs_without_json": (["generate", "-p", "hi", "--logprobs", "2"], ("--json",)),
    "serve_bad_spill_budget": (["serve", "--spill-budget", "lots", "--port", "0"], ("--spill-budget", "lots")),
    "perplexity_missing_file": (["perplexity", "nowhere.txt"], ("nowhere.txt",)),
    "perplexity_binary_file": (["perplexity", "garbage.gguf"], ("garbage.gguf", "utf-8")),
    "info_two_models": (["info", "a.gguf", "--model", "b.gguf"], ("a.gguf", "b.gguf")),
    "estimate_model_flag": (["estimate", "--model", "tinyllama"], ("tinyllama", "smollm2-135m")),
}


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    folder = tmp_path_factory.mktemp("bad_input")
    write_gguf(folder / "gpt2.gguf", arch="gpt2")
    truncate(write_gguf(folder / "truncated.gguf"))
    write_garbage(folder / "garbage.gguf")
    for name, text in SCRIPTS.items():
        (folder / name).write_text(text)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(kvbound, *args, cwd=folder, timeout=60) for case, (args, _) in BAD_INPUT.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case: str, bad_input_results) -> None:
    assert_user_error(bad_input_results[case], *BAD_INPUT[case][1])


def test_pull_known_model_already_installed(smollm2_gguf: Path) -> None:
    if not smollm2_gguf.is_file():
        pytest.skip("the default model is not installed")
    result = kvbound("pull", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout and str(smollm2_gguf) in result.stdout


def test_no_arguments_prints_help() -> None:
    result = kvbound()
    assert result.returncode == 0 and "converse" in result.stdout and "generate" in result.stdout


@pytest.mark.model
def test_a_memory_warning_is_printed_once_and_not_inside_the_reply() -> None:
    result = kvbound("generate", "--prompt", "Write a long poem about the sea.", "--kv-tokens", "64", "--greedy",
                     "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert "KV use" not in result.stdout, result.stdout  # the reply holds only the reply
    lines = [line for line in result.stderr.splitlines() if "crossed 80%" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:"), result.stderr
    assert "the reply was cut: the KV cache is full" in result.stderr  # context_full says why
