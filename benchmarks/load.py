"""Concurrent chat clients against a real `kvbound serve` (one shared KV budget, sessions) and against llama.cpp's
OpenAI server (llama-cpp-python, one context of a similar KV size), the same GGUF, the same client load.

Each client takes its own slice of the scripted dev conversation and answers turn after turn, streaming (greedy),
so time to first token and the gaps between tokens are measured as a client sees them. kvbound clients keep a
session by id and send only the new message; llama.cpp has no sessions, so its clients resend the whole history.
While the clients run, the server's RSS is sampled (psutil) and kvbound's KV use is polled (GET /v1/memory).
llama.cpp runs as it is served (requests one at a time), with its RAM prompt cache, and with its default of
interrupting a stream when another request arrives (--quick only, unless named in --systems).

    python -m benchmarks.load [--quick] [--clients 8] [--turns 12] [--max-tokens 48] [--kv-budget 48MiB]
                              [--systems kvbound llamacpp llamacpp-cache llamacpp-interrupt]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common

SUITE = "load"
KVBOUND = "kvbound serve"
LLAMACPP = "llama.cpp server"
LLAMACPP_CACHE = "llama.cpp server + RAM prompt cache"
LLAMACPP_INTERRUPT = "llama.cpp server, interrupt_requests on (its default)"
SYSTEMS = {"kvbound": KVBOUND, "llamacpp": LLAMACPP, "llamacpp-cache": LLAMACPP_CACHE,
           "llamacpp-interrupt": LLAMACPP_INTERRUPT}
FULL_SYSTEMS = ("kvbound", "llamacpp", "llamacpp-cache")  # the interrupting variant shows all it has in --quick
# Clients retry as the openai client does with `max_retries` (--max-retries, default 0: a 429 or a request that got
# no response at all is final); a retried 429 waits its Retry-After first.
MAX_RETRIES = 0
RSS_EVERY_S, MEMORY_EVERY_S = 0.2, 0.5
READY_TIMEOUT_S, REQUEST_TIMEOUT_S = 300, 600
SERIES_POINTS = 200  # samples of each time series kept in the JSON
ITL_POINTS = 201  # quantiles of the inter-token gaps kept in the JSON


@dataclass
class Load:
    clients: int
    turns: int
    max_tokens: int
    max_retries: int = MAX_RETRIES


@dataclass
class Server:
    """A server subprocess: how to start it, where it listens, what to poll."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    memory_path: str | None = None  # kvbound's GET /v1/memory
    session_ids: bool = False  # clients keep a session by id and send only the new message

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# -- servers ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvbound_server(kv_budget: str, policy: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "kvbound", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--kv-budget", kv_budget, "--policy", policy, "--log-level", "warning"]
    return Server(KVBOUND, argv, port, "/health", memory_path="/v1/memory", session_ids=True)


def llamacpp_server(name: str, model: Path, n_ctx: int, cache_bytes: int) -> Server:
    """Requests wait their turn (interrupt_requests off) unless `name` is the interrupting variant; logits_all is
    off in every variant (its server default is on: logits for every prompt token and an n_ctx x vocab float
    buffer, 400 MB here, that only logprobs need; kvbound computes the last position's logits only)."""
    port = free_port()
    script = common.BENCH / "peers" / "llamacpp_server.py"
    argv = [str(common.venv_python("llamacpp")), str(script), "--model", str(model), "--n_ctx", str(n_ctx),
            "--n_threads", str(common.THREADS), "--n_threads_batch", str(common.THREADS), "--n_batch", "512",
            "--flash_attn", "true", "--logits_all", "false",
            "--interrupt_requests", "true" if name == LLAMACPP_INTERRUPT else "false",
            "--host", "127.0.0.1", "--port", str(port), "--verbose", "false"]
    if name == LLAMACPP_CACHE:  # llama-cpp-python keeps each finished prompt's state; longest prefix is restored
        argv += ["--cache", "true", "--cache_type", "ram", "--cache_size", str(cache_bytes)]
    return Server(name, argv, port, "/v1/models")


def llamacpp_available() -> tuple[str | None, str]:
    """(the server venv's llama_print_system_info(), "") or (None, why it cannot be used)."""
    python = common.venv_python("llamacpp")
    if not python.is_file():
        return None, f"no venv at {python.parent.parent} (bash benchmarks/peers/setup.sh llamacpp)"
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True, text=True,
                           env=common.script_env(), check=False)
    if probe.returncode != 0:
        return None, ("llama_cpp.server does not import in its venv (pip install 'llama-cpp-python[server]'): "
                      + probe.stderr.strip().splitlines()[-1][:200])
    return common.llamacpp_build(python)


def start(server: Server, log_file) -> subprocess.Popen:
    import httpx

    # one thread for the server: the box has two cores and the clients need the other
    proc = subprocess.Popen(server.argv, cwd=common.ROOT, env=common.script_env(), stdout=log_file,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(server.url + server.ready_path, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{server.name} was not ready after {READY_TIMEOUT_S} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vm_hwm(pid: int) -> int | None:
    """The server's lifetime peak RSS (model loading included), from /proc while it still runs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Sampler(threading.Thread):
    """Samples the server's RSS and, where it has one, its KV pool (GET /v1/memory) until stopped."""

    def __init__(self, pid: int, memory_url: str | None, t0: float):
        super().__init__(daemon=True)
        import psutil

        self.process, self.memory_url, self.t0 = psutil.Process(pid), memory_url, t0
        self.rss: list[tuple[float, int]] = []
        self.kv: list[tuple[float, int, int]] = []  # (t, used bytes, budget bytes)
        self.memory_errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        import httpx

        next_memory = 0.0
        with httpx.Client(timeout=10) as http:
            while not self.halt.is_set():
                now = time.perf_counter() - self.t0
                try:
                    self.rss.append((now, self.process.memory_info().rss))
                except Exception:  # the process is gone; the clients will say why
                    break
                if self.memory_url and now >= next_memory:
                    next_memory = now + MEMORY_EVERY_S
                    try:
                        pool = http.get(self.memory_url).json()["pool"]
                        self.kv.append((now, pool["used_bytes"], pool["budget_bytes"]))
                    except (httpx.HTTPError, KeyError, ValueError):
                        self.memory_errors += 1
                self.halt.wait(RSS_EVERY_S)


# -- clients ---------------------------------------------------------------------------------------------------
@dataclass
class Turn:
    client: int
    turn: int
    outcome: str = "error"  # ok, truncated (stream ended without a finish reason), refused, error
    reason: str = ""
    http_status: int | None = None
    attempts: int = 0
    refusals: list[str] = field(default_factory=list)  # "429 code" of every refused attempt
    connection_errors: list[str] = field(default_factory=list)  # requests sent again: no response at all
    ttft_s: float | None = None  # from the first attempt, as a user waits (retries included)
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0  # content chunks streamed (one token each for both servers)
    usage_tokens: int | None = None
    finish_reason: str | None = None
    wall_s: float = 0.0
    text: str = ""
    kvbound: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        """What the JSON keeps per turn (not the text, nor every gap: the system keeps their quantiles)."""
        row = {"client": self.client, "turn": self.turn, "outcome": self.outcome, "reason": self.reason or None,
               "http_status": self.http_status, "attempts": self.attempts,
               "connection_errors": self.connection_errors or None, "ttft_s": _round(self.ttft_s),
               "tokens": self.tokens, "usage_tokens": self.usage_tokens, "finish_reason": self.finish_reason,
               "wall_s": _round(self.wall_s),
               "max_gap_ms": round(max(self.gaps_s) * 1000, 1) if self.gaps_s else None}
        if self.kvbound:
            row.update({f"kvbound_{k}": self.kvbound.get(k) for k in (
                "session_state", "prefilled_tokens", "refed_history_tokens", "reused_tokens", "context_tokens",
                "evicted_tokens", "kv_bytes")})
        return {k: v for k, v in row.items() if v is not None}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _error_reason(response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error.get('code') or error.get('type')}: {error.get('message', '')[:240]}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{response.status_code}: {response.text[:240]}"


def stream_turn(http, server: Server, messages: list[dict[str, str]], session: str | None, max_tokens: int,
                turn: Turn, retries: int = MAX_RETRIES) -> Turn:
    """One chat turn, streamed; up to `retries` more attempts, as the openai client makes them: a 429 after its
    Retry-After, a request without any response at once. Fills `turn` and returns it."""
    import httpx

    body: dict[str, Any] = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if session:
        body["session_id"] = session
    started = time.perf_counter()
    while True:
        turn.attempts += 1
        responded = False
        try:
            with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
                turn.http_status, responded = response.status_code, True
                if response.status_code in (413, 429):
                    response.read()
                    reason = _error_reason(response)
                    turn.refusals.append(reason.split(":", 1)[0])
                    turn.outcome, turn.reason = "refused", reason
                    wait = float(response.headers.get("retry-after", 1))
                    if response.status_code == 429 and turn.attempts <= retries:
                        time.sleep(wait)
                        continue
                    break
                if response.status_code != 200:
                    response.read()
                    turn.outcome, turn.reason = "error", _error_reason(response)
                    break
                _read_stream(response, started, turn)
                break
        except httpx.HTTPError as e:
            reason = f"{type(e).__name__}: {e}"[:240]
            if not responded and turn.attempts <= retries:
                turn.connection_errors.append(reason)  # e.g. a kept-alive connection the server had closed
                continue
            turn.outcome, turn.reason = "error", reason
            break
    turn.wall_s = time.perf_counter() - started
    return turn


def _read_stream(response, started: float, turn: Turn) -> None:
    last, done, parts = None, False, []
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            turn.usage_tokens = chunk["usage"].get("completion_tokens")
        if chunk.get("kvbound"):
            turn.kvbound = chunk["kvbound"]
        for choice in chunk.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                now = time.perf_counter()
                if last is None:
                    turn.ttft_s = now - started
                else:
                    turn.gaps_s.append(now - last)
                last = now
                turn.tokens += 1
                parts.append(content)
            if choice.get("finish_reason"):
                turn.finish_reason = choice["finish_reason"]
    turn.text = "".join(parts)
    if done and turn.finish_reason:
        turn.outcome, turn.reason = "ok", ""
    elif done:
        turn.outcome, turn.reason = "truncated", "stream ended ([DONE]) without a finish reason"
    else:
        turn.outcome = "error"
        turn.reason = "stream closed without [DONE]" + (" and without any token" if not turn.tokens else "")


def run_client(server: Server, index: int, system: str, user_turns: list[str], load: Load, tag: str,
               barrier: threading.Barrier, out: list[Turn]) -> None:
    import httpx

    session = f"load-{tag}-c{index}" if server.session_ids else None
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)) as http:
        barrier.wait()
        for number, user in enumerate(user_turns):
            message = {"role": "user", "content": user}
            # kvbound keeps the conversation in its session: only the new message (and the system prompt) is sent
            messages = [history[0], message] if session else [*history, message]
            turn = Turn(index, number)
            try:
                stream_turn(http, server, messages, session, load.max_tokens, turn, load.max_retries)
            except Exception as e:  # a malformed stream: recorded as this turn's error, the client goes on
                turn.outcome, turn.reason = "error", f"{type(e).__name__}: {e}"[:240]
            out.append(turn)
            if turn.outcome in ("ok", "truncated"):  # the client saw a reply: it becomes history
                history += [message, {"role": "assistant", "content": turn.text}]


def conversation(load: Load) -> tuple[str, list[list[str]], str]:
    path = common.data_file("conversations/dev-200-turns.jsonl")
    lines = common.read_jsonl(path)
    system = lines[0]["system"]
    users = [line["user"] for line in lines[1:] if "user" in line]
    if load.clients * load.turns > len(users):
        raise ValueError(f"{load.clients} clients x {load.turns} turns needs {load.clients * load.turns} turns; "
                         f"{path.name} has {len(users)}")
    slices = [users[i * load.turns:(i + 1) * load.turns] for i in range(load.clients)]
    return system, slices, str(path.relative_to(common.ROOT) if path.is_relative_to(common.ROOT) else path)


# -- one system ------------------------------------------------------------------------------------------------
def measure_system(server: Server, load: Load, system: str, slices: list[list[str]]) -> dict[str, Any]:
    """Start the server, warm it up, run the clients while sampling, stop it; its entry in the JSON."""
    import httpx
    import psutil

    common.log(f"{server.name}: starting ({' '.join(server.argv[:4])} ...)")
    with tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="load-server-") as log_file:
        load_started = time.perf_counter()
        proc = start(server, log_file)
        startup_s = time.perf_counter() - load_started
        try:
            warm = Turn(-1, -1)  # first-call allocations; not counted
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
                stream_turn(http, server, [{"role": "system", "content": system},
                                           {"role": "user", "content": "Hello."}],
                            "warmup" if server.session_ids else None, 8, warm)
                if server.session_ids:
                    http.delete(server.url + "/v1/sessions/warmup")
            if warm.outcome != "ok":
                raise RuntimeError(f"{server.name}: the warm-up request failed: {warm.reason}")
            tag = f"{int(time.time())}"
            turns: list[Turn] = []
            barrier = threading.Barrier(load.clients + 1)
            threads = [threading.Thread(target=run_client, args=(server, i, system, slices[i], load, tag, barrier,
                                                                 turns), daemon=True)
                       for i in range(load.clients)]
            for t in threads:
                t.start()
            rss_before = psutil.Process(proc.pid).memory_info().rss
            total = load.clients * load.turns
            barrier.wait()
            t0 = time.perf_counter()
            sampler = Sampler(proc.pid, server.url + server.memory_path if server.memory_path else None, t0)
            sampler.start()
            with common.progress(total, server.name) as advance:
                seen = 0
                while any(t.is_alive() for t in threads):
                    time.sleep(0.5)
                    if len(turns) > seen:
                        done = turns[seen:len(turns)]
                        advance(len(done), note=", ".join(sorted({t.outcome for t in done})))
                        seen += len(done)
                for t in threads:
                    t.join()
                if len(turns) > seen:
                    advance(len(turns) - seen)
            wall_s = time.perf_counter() - t0
            sampler.halt.set()
            sampler.join()
            final_memory = None
            if server.memory_path:
                final_memory = httpx.get(server.url + server.memory_path, timeout=30).json()
            hwm = vm_hwm(proc.pid)
        finally:
            stop(proc)
        log_file.seek(0)
        log_text = log_file.read()
    entry = summarize(server, turns, wall_s, sampler, rss_before, hwm, final_memory, log_text)
    entry["startup_s"] = round(startup_s, 2)
    return entry


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def itl_quantiles(gaps_s: list[float]) -> list[float]:
    """The inter-token gaps at every half percentile (0, 0.5, ..., 100), in ms: their CDF, without every gap."""
    if not gaps_s:
        return []
    import numpy as np

    return [round(float(x) * 1000, 2) for x in np.percentile(np.asarray(gaps_s), np.linspace(0, 100, ITL_POINTS))]


def _thin(series: list[tuple], points: int = SERIES_POINTS) -> list[list]:
    step = max(1, -(-len(series) // points))
    kept = series[::step]
    if series and kept[-1] is not series[-1]:
        kept.append(series[-1])
    return [[round(x, 3) if isinstance(x, float) else x for x in row] for row in kept]


def summarize(server: Server, turns: list[Turn], wall_s: float, sampler: Sampler, rss_before: int,
              hwm: int | None, final_memory: dict | None, log_text: str) -> dict[str, Any]:
    turns = sorted(turns, key=lambda t: (t.client, t.turn))
    outcomes = Counter(t.outcome for t in turns)
    ttft = [t.ttft_s for t in turns if t.ttft_s is not None]
    gaps = [g for t in turns for g in t.gaps_s]
    tokens = sum(t.tokens for t in turns)
    refusals = Counter(r for t in turns for r in t.refusals)
    rss = [b for _, b in sampler.rss]
    entry: dict[str, Any] = {
        "system": server.name, "command": " ".join(server.argv), "turns": len(turns),
        "ok": outcomes["ok"], "truncated": outcomes["truncated"], "errors": outcomes["error"],
        "refused": outcomes["refused"], "refused_responses": sum(refusals.values()), "refusal_codes": dict(refusals),
        "turns_waiting_over_60s_on_429": sum(1 for t in turns if t.refusals and t.wall_s > 60),
        "most_attempts": max((t.attempts for t in turns), default=0),
        "connection_retries": sum(len(t.connection_errors) for t in turns),
        "connection_error_reasons": [r.split(":", 1)[0] for t in turns for r in t.connection_errors],
        "error_reasons": dict(Counter(t.reason for t in turns if t.outcome == "error")),
        "refused_reasons": sorted({t.reason for t in turns if t.outcome == "refused"})[:2],
        "truncated_reasons": dict(Counter(t.reason for t in turns if t.outcome == "truncated")),
        "finish_reasons": dict(Counter(str(t.finish_reason) for t in turns if t.outcome in ("ok", "truncated"))),
        "wall_s": round(wall_s, 2), "generated_tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s else None,
        "usage_completion_tokens": sum(t.usage_tokens for t in turns if t.usage_tokens is not None)
        if any(t.usage_tokens is not None for t in turns) else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95), "ttft_max_s": max(ttft, default=None),
        "itl_p50_s": percentile(gaps, 50), "itl_p95_s": percentile(gaps, 95), "itl_max_s": max(gaps, default=None),
        "itl_quantiles_ms": itl_quantiles(gaps),
        "tokens_per_reply_mean": tokens / max(1, outcomes["ok"] + outcomes["truncated"]),
        "replies_without_tokens": sum(1 for t in turns if t.outcome in ("ok", "truncated") and not t.tokens),
        "ttft_turns": len(ttft),
        "rss_before_load_bytes": rss_before, "rss_peak_sampled_bytes": max(rss, default=None),
        "rss_last_bytes": rss[-1] if rss else None, "rss_samples": len(rss),
        "server_vm_hwm_bytes": hwm,
        "series": {"rss": _thin(sampler.rss), "kv": _thin(sampler.kv)},
        "turn_rows": [t.row() for t in turns],
    }
    if sampler.kv:
        used = [u for _, u, _ in sampler.kv]
        budget = sampler.kv[0][2]
        entry.update({"kv_budget_bytes": budget, "kv_peak_bytes": max(used), "kv_samples": len(used),
                      "kv_never_above_budget": all(u <= b for _, u, b in sampler.kv),
                      "memory_poll_errors": sampler.memory_errors})
    if final_memory:
        entry["final_engine"] = final_memory.get("engine")
        entry["final_pool"] = final_memory.get("pool")
        process = final_memory.get("process", {})
        entry["server_reported_peak_rss_bytes"] = process.get("peak_rss_bytes")
        entry["weights_bytes"] = process.get("weights_bytes")
    states = Counter(t.kvbound.get("session_state") for t in turns if t.kvbound)
    if states:
        entry["session_states"] = dict(states)
        for key in ("refed_history_tokens", "prefilled_tokens", "evicted_tokens", "reused_tokens"):
            entry[f"sum_{key}"] = sum(t.kvbound.get(key) or 0 for t in turns if t.kvbound)
    overflows = [line for line in log_text.splitlines()  # the traceback's own line; its exception group repeats it
                 if line.startswith("ValueError: Requested tokens") and "exceed context window" in line]
    if overflows:
        entry["log_context_exceeded"] = len(overflows)
    entry["log_tail"] = log_text.strip().splitlines()[-5:] if entry["errors"] else []
    return entry


# -- plot ------------------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Drawn from the JSON alone (per-turn TTFT, gap quantiles, the thinned RSS and KV series): it can be redrawn."""
    plt = common.pyplot()
    if plt is None:
        return None
    import numpy as np

    fig, ((ax_ttft, ax_itl), (ax_rss, ax_kv)) = plt.subplots(2, 2, figsize=(13, 9))
    colors = {}
    systems = [e for e in result["systems"] if "failed" not in e]
    for e in systems:
        name, series = e["system"], e["series"]
        ttft = np.sort([t["ttft_s"] for t in e["turn_rows"] if t.get("ttft_s") is not None])
        if len(ttft):
            line, = ax_ttft.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
            colors[name] = line.get_color()
        gaps = e.get("itl_quantiles_ms") or []
        if gaps:
            ax_itl.plot(gaps, np.linspace(0, 1, len(gaps)), label=name, color=colors.get(name))
        if series["rss"]:
            line, = ax_rss.plot([t for t, _ in series["rss"]], [b / 2**20 for _, b in series["rss"]],
                                color=colors.get(name), label=name)
            colors[name] = line.get_color()
        if series["kv"]:
            ax_kv.plot([t for t, _, _ in series["kv"]], [u / 2**20 for _, u, _ in series["kv"]],
                       color=colors.get(name), label=f"{name}: KV pool used")
            ax_kv.axhline(series["kv"][0][2] / 2**20, color=colors.get(name), linestyle=":",
                          label=f"{name}: --kv-budget")
    llamacpp_kv = result["config"].get("llamacpp_kv_bytes")
    if llamacpp_kv and any(e["system"] != KVBOUND for e in systems):
        ax_kv.axhline(llamacpp_kv / 2**20, color="grey", linestyle="--",
                      label=f"llama.cpp: n_ctx {result['config']['llamacpp_n_ctx']} f16 KV (allocated at start)")
    ax_ttft.set(xscale="log", xlabel="time to first token (s)", ylabel="fraction of turns", title="TTFT, CDF")
    ax_itl.set(xscale="log", xlabel="gap between tokens (ms)", ylabel="fraction of gaps", title="Inter-token, CDF")
    ax_rss.set(xlabel="seconds into the load", ylabel="MiB", title="server RSS (psutil, every 0.2 s)")
    ax_kv.set(xlabel="seconds into the load", ylabel="MiB", title="KV cache (kvbound: GET /v1/memory, every 0.5 s)")
    ax_kv.set_ylim(bottom=0)
    for ax in (ax_ttft, ax_itl, ax_rss, ax_kv):
        ax.grid(alpha=0.3)
    for ax in (ax_ttft, ax_rss, ax_kv):
        ax.legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(f"{cfg['clients']} concurrent streaming clients x {cfg['turns_per_client']} turns, "
                 f"max {cfg['max_tokens']} tokens, greedy, servers on 1 thread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the suite -------------------------------------------------------------------------------------------------
def measure(load: Load, kv_budget: str, policy: str, llamacpp_ctx: int, llamacpp_cache: str,
            systems: list[str]) -> dict[str, Any]:
    common.pin_threads()
    from kvbound.loading import resolve_model

    model = resolve_model()
    system, slices, conversation_file = conversation(load)
    from kvbound.kvcache.spec import parse_size

    servers = [kvbound_server(kv_budget, policy)] if KVBOUND in systems else []
    peers = [name for name in systems if name != KVBOUND]
    unavailable: dict[str, str] = {}
    llamacpp_info = None
    if peers:
        llamacpp_info, why = llamacpp_available()
        for name in peers:
            if llamacpp_info:
                servers.append(llamacpp_server(name, model, llamacpp_ctx, parse_size(llamacpp_cache)))
            else:
                unavailable[name] = why
    entries = []
    for server in servers:
        try:
            entry = measure_system(server, load, system, slices)
        except Exception as e:  # a peer that cannot start is recorded, not fatal; kvbound failing is checked below
            common.log(f"{server.name}: failed: {e}")
            entries.append({"system": server.name, "command": " ".join(server.argv), "failed": str(e)})
            continue
        entries.append(entry)
    # llama.cpp's KV: f16 K and V for n_ctx cells, read from kvbound's one place for KV arithmetic
    from kvbound.kvcache.spec import KVSpec
    from kvbound.loading import open_checkpoint

    llamacpp_kv_bytes = int(KVSpec.for_model(open_checkpoint(model).config, dtype="fp16").bytes_per_token
                            * llamacpp_ctx)
    config = {
        "clients": load.clients, "turns_per_client": load.turns, "max_tokens": load.max_tokens, "temperature": 0,
        "conversation": conversation_file, "model": str(model), "kv_budget": kv_budget, "policy": policy,
        "llamacpp_n_ctx": llamacpp_ctx, "llamacpp_cache_size": llamacpp_cache,
        "llamacpp_kv_bytes": llamacpp_kv_bytes,
        "server_threads": common.THREADS, "max_retries": load.max_retries,
        "llamacpp_system_info": llamacpp_info,
        **source_state(),
        "kvbound_clients": "session_id in the body; each request sends the system prompt and the new message",
        "llamacpp_clients": "no sessions: each request resends the whole history; a failed turn is left out of it",
        "ttft": "from the first attempt's request to the first content chunk (429 waits included)",
        "itl": "gaps between content chunks of one reply (one token per chunk), pooled over all replies",
        "tokens_per_s": "content chunks of all replies / wall time of the whole load",
    }
    return {"config": config, "systems": entries, "unavailable": unavailable}


def source_state() -> dict[str, Any]:
    """The commit the kvbound server ran from, and the files under src/ changed from it (the editable install runs
    the working tree)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=common.ROOT, capture_output=True, text=True, check=False)
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"kvbound_commit": git("rev-parse", "HEAD") or None, "kvbound_src_changed_files": changed}


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """kvbound must answer every turn (429 retried is fine) and never hold more KV than its budget."""
    ours = next((e for e in result["systems"] if e["system"] == KVBOUND), {})
    out = {"kvbound_ran": "failed" not in ours and bool(ours),
           "kvbound_no_errors": ours.get("errors") == 0 and ours.get("truncated") == 0,
           "kvbound_kv_never_above_budget": bool(ours.get("kv_never_above_budget")),
           "kvbound_kv_polled": bool(ours.get("kv_samples"))}
    out["passed"] = all(out.values())
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for e in result["systems"]:
        if "failed" in e:
            rows.append([e["system"], f"failed: {e['failed']}"] + [None] * 10)
            continue
        if e.get("kv_budget_bytes"):
            kv = f"{common.mib(e['kv_peak_bytes']):,.1f} / {common.mib(e['kv_budget_bytes']):,.1f}"
        else:
            kv = f"{common.mib(cfg['llamacpp_kv_bytes']):,.1f} (n_ctx, fixed)"
            if e["system"] == LLAMACPP_CACHE:
                kv += f" + prompt cache ≤ {cfg['llamacpp_cache_size']} of states"
        few = f" (of {e['ttft_turns']} replies with a token)" if e.get("ttft_turns", e["turns"]) < e["turns"] else ""
        rows.append([e["system"], f"{e['ok']}/{e['turns']}", e["truncated"], e["errors"],
                     f"{e['refused']} ({e['refused_responses']} × 429/413)",
                     e["ttft_p50_s"], f"{e['ttft_p95_s']:.3g}{few}" if e["ttft_p95_s"] else None,
                     _ms(e["itl_p50_s"]), _ms(e["itl_p95_s"]),
                     e["tokens_per_s"], common.mib(e["rss_peak_sampled_bytes"]), kv])
    table = common.markdown_table(
        ["server", "turns answered", "truncated", "errors", "refused turns (responses)", "TTFT p50 s", "TTFT p95 s",
         "inter-token p50 ms", "inter-token p95 ms", "generated tok/s (all clients)", "server peak RSS MiB (load)",
         "KV MiB peak / budget"], rows)
    head = (f"{cfg['clients']} clients at once, each {cfg['turns_per_client']} turns of its own slice of "
            f"`{Path(cfg['conversation']).name}`, streamed, greedy, at most {cfg['max_tokens']} tokens a reply; "
            f"each server on one thread, started fresh. kvbound: `--kv-budget {cfg['kv_budget']} --policy "
            f"{cfg['policy']}`, clients keep a session by id and send only the new message. llama.cpp: "
            f"`--n_ctx {cfg['llamacpp_n_ctx']}` (one context, "
            f"{common.mib(cfg.get('llamacpp_kv_bytes')) or '?'} MiB of f16 KV; `--logits_all false`, flash "
            f"attention on, CPU extra buffers on as in the decode suite), clients resend the whole history. "
            f"TTFT counts from the first attempt (429 waits included); tok/s is all replies' tokens over the "
            f"wall time of the whole load.")
    notes = []
    for e in result["systems"]:
        if "failed" in e:
            continue
        name = e["system"]
        if e.get("session_states"):
            notes.append(f"- {name}: session states {e['session_states']}; history tokens fed again to restore "
                         f"offloaded sessions: {e['sum_refed_history_tokens']:,}; tokens evicted: "
                         f"{e['sum_evicted_tokens']:,}; KV never above budget: {e.get('kv_never_above_budget')} "
                         f"({e.get('kv_samples')} polls); {_engine_note(e.get('final_engine') or {})}.")
        for reason, n in e.get("error_reasons", {}).items():
            notes.append(f"- {name}: {n} × error: {reason}")
        if e.get("log_context_exceeded"):
            notes.append(f"- {name}: its log says `Requested tokens (…) exceed context window of "
                         f"{cfg['llamacpp_n_ctx']}` {e['log_context_exceeded']} times (a streamed request over "
                         f"n_ctx is answered 200 and an empty stream).")
        for reason, n in e.get("truncated_reasons", {}).items():
            notes.append(f"- {name}: {n} × truncated: {reason}; {e['replies_without_tokens']} replies had no "
                         f"token at all (mean {e['tokens_per_reply_mean']:.1f} tokens a reply; its TTFT is over the "
                         f"{e['ttft_turns']} replies with one)")
        for reason in e.get("refused_reasons", []):
            notes.append(f"- {name}: refused: {reason}")
        if e.get("refusal_codes"):
            retried = (f"429 retried after Retry-After, up to {cfg['max_retries']} times a turn" if
                       cfg.get("max_retries") else "clients with max_retries=0: a 429 is final")
            notes.append(f"- {name}: refused responses by code: {e['refusal_codes']} ({retried}); "
                         f"{e.get('turns_waiting_over_60s_on_429', 0)} turns took over a minute with 429s "
                         f"(at most {e.get('most_attempts')} attempts for one turn)")
        if e.get("connection_retries"):
            notes.append(f"- {name}: {e['connection_retries']} requests sent again after no response at all "
                         f"({', '.join(sorted(set(e['connection_error_reasons'])))[:200]}), as the openai client "
                         f"with max_retries={cfg.get('max_retries')} would")
        hwm = e.get("server_vm_hwm_bytes")
        if hwm:
            notes.append(f"- {name}: RSS {common.mib(e['rss_before_load_bytes']):,.0f} MiB before the load, "
                         f"{common.mib(e['rss_peak_sampled_bytes']):,.0f} MiB peak during it "
                         f"({e['rss_samples']} samples); lifetime peak (VmHWM, model loading included) "
                         f"{common.mib(hwm):,.0f} MiB; {e['wall_s']:.0f} s of load, {e['generated_tokens']:,} tokens.")
    for name, why in result.get("unavailable", {}).items():
        notes.append(f"- {name}: unavailable: {why}")
    c = result.get("checks", {})
    if c:
        notes.append(f"- checks: {', '.join(f'{k} {v}' for k, v in c.items())}")
    return "\n".join([head, "", table, "", *[f"- {line}" for line in headlines(result)], *notes])


def _engine_note(engine: dict[str, Any]) -> str:
    parts = [f"at most {engine['peak_active']} generations at once" if "peak_active" in engine else "",
             f"{engine['offloads']} session offloads" if "offloads" in engine else ""]
    decode = engine.get("decode") or {}
    if decode.get("mean_batch_size"):
        parts.append(f"decode batch {decode['mean_batch_size']:.2f} on average (max {decode.get('max_batch_size')})")
    spill = engine.get("spill") or {}
    if spill.get("written"):
        parts.append(f"spill: {spill['written']} sessions written to disk, {spill['restored']} restored from it "
                     f"without a prefill, {spill['bytes'] / 2**20:,.0f} MiB on disk at the end "
                     f"(budget {spill['budget'] / 2**20:,.0f} MiB)")
    return "engine: " + ", ".join(p for p in parts if p) if any(parts) else "engine: —"


def headlines(result: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers: kvbound, then each llama.cpp variant against it."""
    by = {e["system"]: e for e in result.get("systems", []) if "failed" not in e}
    ours = by.get(KVBOUND)
    lines = []
    if ours:
        kv = (f", KV peak {common.mib(ours['kv_peak_bytes']):,.1f} of {common.mib(ours['kv_budget_bytes']):,.1f} "
              f"MiB" if ours.get("kv_budget_bytes") else "")
        lines.append(f"{result['config']['clients']} concurrent chat clients on `kvbound serve`: "
                     f"{ours['ok']}/{ours['turns']} turns answered, {ours['errors']} errors, {ours['refused']} refused "
                     f"({ours['refused_responses']} 429s retried); TTFT p50 {ours['ttft_p50_s']:.2f} s, p95 "
                     f"{ours['ttft_p95_s']:.2f} s; {ours['generated_tokens']:,} tokens in {ours['wall_s']:.0f} s "
                     f"({ours['tokens_per_s']:.1f} tok/s){kv}.")
    for name in (LLAMACPP, LLAMACPP_CACHE, LLAMACPP_INTERRUPT):
        peer = by.get(name)
        if not (ours and peer):
            continue

        def cmp(key: str, lower_better: bool = True) -> str:
            a, b = ours.get(key), peer.get(key)
            if not a or not b:
                return "n/a"
            ratio = a / b
            better = ratio < 1 if lower_better else ratio > 1
            return f"{ratio:.2f}x ({'kvbound better' if better else 'llama.cpp better'})"

        lines.append(f"kvbound against {name}, which answered {peer['ok']}/{peer['turns']} turns "
                     f"({peer['errors']} errors, {peer['truncated']} truncated; {peer['generated_tokens']:,} tokens in "
                     f"{peer['wall_s']:.0f} s): kvbound's TTFT p50 "
                     f"{cmp('ttft_p50_s')}, p95 {cmp('ttft_p95_s')}; inter-token p50 {cmp('itl_p50_s')}, p95 "
                     f"{cmp('itl_p95_s')}; tok/s {cmp('tokens_per_s', lower_better=False)}; peak RSS "
                     f"{cmp('rss_peak_sampled_bytes')}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 clients x 5 turns, 24 tokens a reply")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--turns", type=int, help="turns per client")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--kv-budget", default="48MiB", help="kvbound serve --kv-budget")
    parser.add_argument("--policy", default="turns+h2o", help="kvbound serve --policy")
    parser.add_argument("--llamacpp-ctx", type=int, default=2048,
                        help="llama.cpp n_ctx (2048: about the KV bytes of a 48MiB kvbound pool)")
    parser.add_argument("--llamacpp-cache", default="512MiB",
                        help="--cache_size of the prompt-cache variant (llama-cpp-python counts only KV state bytes)")
    parser.add_argument("--max-retries", type=int, default=MAX_RETRIES,
                        help="retries of a turn, as the openai client's max_retries (default 0: a 429 is final)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS),
                        help=f"default: {' '.join(FULL_SYSTEMS)}; with --quick all of them")
    args = parser.parse_args(argv)
    load = Load(clients=args.clients or (4 if args.quick else 8), turns=args.turns or (5 if args.quick else 12),
                max_tokens=args.max_tokens or (24 if args.quick else 48), max_retries=args.max_retries)
    systems = [SYSTEMS[k] for k in args.systems or (SYSTEMS if args.quick else FULL_SYSTEMS)]
    result = measure(load, args.kv_budget, args.policy, args.llamacpp_ctx, args.llamacpp_cache, systems)
    result["checks"] = checks(result)
    png = plot(result, common.RESULTS / "load.png")
    result["plot"] = str(png.relative_to(common.ROOT)) if png else None
    common.finish(SUITE, result, args.quick, markdown)
    if not result["checks"]["passed"]:
        common.log(f"load: checks failed: {result['checks']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
