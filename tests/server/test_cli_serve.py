"""`kvbound serve` as a user runs it: a subprocess that serves the openai client until interrupted, and bad options
that end in one `error:` line and exit code 2."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_cli import assert_user_error


def kvbound(*args: str | Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvbound", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_serve_answers_the_openai_client_until_interrupted(tiny_model: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbound", "serve", "--model", str(tiny_model), "--device", "cpu", "--port", "0",
         "--kv-budget", "256KiB", "--policy", "window", "--model-id", "tiny-served"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "KVBOUND_API_KEY": "k3y"})
    lines: list[str] = []
    try:
        url = None
        for line in process.stderr:
            lines.append(line)
            found = re.search(r" on (http://127\.0\.0\.1:\d+) · ", line)  # the startup line names the port
            url = found.group(1) if found else url
            if "Application startup complete" in line:
                break
        assert url, "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
        reader.start()
        assert "tiny-served" in "".join(lines) and "512 tokens" in "".join(lines)  # the startup line
        assert httpx.get(url + "/v1/models").status_code == 401  # KVBOUND_API_KEY was honoured
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-served"]
        chunks = list(client.chat.completions.create(model="tiny-served", stream=True, max_tokens=4,
                                                     messages=[{"role": "user", "content": "hello"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    reader.join(10)
    assert code == 0, "".join(lines)
    assert "Application shutdown complete" in "".join(lines)  # Ctrl-C shuts down cleanly: the engine stopped
    assert "Traceback" not in "".join(lines)


BAD_OPTIONS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "unknown_policy": (["--policy", "bogus"], ("bogus",)),
    "bad_budget": (["--kv-budget", "12xb"], ("12xb",)),
    "budget_and_tokens": (["--kv-budget", "1MiB", "--kv-tokens", "100"], ("either",)),
    "zero_body": (["--max-body", "0"], ("positive",)),
    "port_out_of_range": (["--port", "70000"], ("--port",)),
    "unknown_kv_dtype": (["--kv-dtype", "int3"], ("--kv-dtype",)),
    "empty_api_key": (["--api-key", " "], ("api key",)),
    "data_dir_not_creatable": (["--data-dir", "/dev/null/sessions"], ("--data-dir",)),
    "budget_under_one_block": (["--kv-budget", "1KiB"], ("block",)),
    "bad_log_level": (["--log-level", "loud"], ("--log-level",)),
}


@pytest.fixture(scope="module")
def bad_option_results(tiny_model: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(kvbound, "serve", "--model", tiny_model, "--device", "cpu", *args, timeout=60)
                   for case, (args, _) in BAD_OPTIONS.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_one_line_and_exit_2(case: str, bad_option_results) -> None:
    assert_user_error(bad_option_results[case], *BAD_OPTIONS[case][1])
