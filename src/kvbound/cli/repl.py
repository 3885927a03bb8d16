"""`kvbound chat`: the read-reply loop and its slash commands. A command never reaches the model; an unknown one
is named back with the list. Multi-line input: a line of three double quotes starts and ends a block."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.markup import escape

from kvbound.chat import snapshot
from kvbound.chat.session import Chat
from kvbound.cli.display import cut_reason, err, memory_bar, one_line, out, reply_status, write
from kvbound.engine.sampler import sampling_params
from kvbound.errors import KvboundError
from kvbound.kvcache.spec import format_bytes
from kvbound.policies import make_policy

if TYPE_CHECKING:
    from kvbound.config import CacheConfig
    from kvbound.llm import LLM

BLOCK = '"""'
HELP = ("/memory where the memory goes · /set temperature|top_p|top_k|max_tokens|seed|policy VALUE · "
        "/save FILE · /load FILE · /reset forgets the conversation (keeps the system prompt) · "
        f'{BLOCK} starts and ends multi-line input · /help · /bye, /exit or Ctrl-D quits')
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
            "seed": int, "max_tokens": int}


class Repl:
    def __init__(self, llm: "LLM", session: Chat, config: "CacheConfig", params: dict[str, Any]):
        self.llm, self.session, self.config, self.params = llm, session, config, params
        self.commands: dict[str, Callable[[str], None]] = {
            "/help": lambda _: out.print(f"[dim]{HELP}[/]"), "/memory": lambda _: self.show_memory(),
            "/reset": lambda _: self.reset(), "/set": self.set, "/save": self.save, "/load": self.load}

    def run(self, read: Callable[[str], str]) -> None:
        while True:
            try:
                text = self.read_message(read)
            except (EOFError, KeyboardInterrupt):
                out.print()
                return
            command, _, argument = text.strip().partition(" ")
            if not command:
                continue
            if command in ("/bye", "/exit", "/quit"):
                return
            if command in self.commands:
                try:
                    self.commands[command](argument.strip())
                except (KvboundError, ValueError, TypeError, OSError) as e:
                    err.print(f"[red]error:[/] {escape(one_line(e))}")
                continue
            if command.startswith("/") and "\n" not in text and not argument:
                out.print(f"[yellow]unknown command {escape(command)}[/] [dim]({HELP})[/]")
                continue
            self.turn(text)

    @staticmethod
    def read_message(read: Callable[[str], str]) -> str:
        first = read("[bold cyan]you ›[/] ")
        if first.strip() != BLOCK:
            return first
        lines = []
        while (line := read("[dim]...[/] ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)

    # -- commands -----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.session.reset()
        out.print("[dim]conversation forgotten; the system prompt is kept[/]")

    def set(self, argument: str) -> None:
        name, _, value = argument.partition(" ")
        value = value.strip()
        if name == "policy":
            return self.set_policy(value)
        if name not in SETTINGS or not value:
            raise ValueError(f"/set takes one of {', '.join([*SETTINGS, 'policy'])} and a value, e.g. "
                             "/set temperature 0.7")
        try:
            parsed = SETTINGS[name](value)
        except ValueError:
            raise ValueError(f"/set {name} needs a number, got {value!r}") from None
        key = "max_new_tokens" if name == "max_tokens" else name
        params = {**self.params, key: parsed}
        sampling_params(**params)  # refused here, with the rule, before it is kept
        self.params = params
        out.print(f"[dim]{name} = {parsed}[/]")

    def set_policy(self, name: str) -> None:
        """Rebuild the conversation into a cache with the new policy (its newest turns are prefilled again)."""
        make_policy(name)  # an unknown name fails here, listing the known ones
        config = dataclasses.replace(self.config, policy=name)
        cache = self.llm.new_cache(config)
        messages = self.session.messages
        old = self.session
        self.session = Chat.from_messages(self.llm, messages, cache)
        old.close()
        self.config = config
        out.print(f"[dim]policy = {name}; the conversation was rebuilt into the new cache "
                  f"({self.session.context_tokens:,} tokens held)[/]")

    def save(self, argument: str) -> None:
        if not argument:
            raise ValueError("/save needs a file name, e.g. /save chat.kvb")
        path = Path(argument).expanduser()
        blob = snapshot.to_bytes(self.session.export_state())
        path.write_bytes(blob)
        out.print(f"[dim]saved {self.session.turn} turns and the KV cache to {escape(str(path))} "
                  f"({format_bytes(len(blob))}); /load {escape(str(path))} continues it[/]")

    def load(self, argument: str) -> None:
        if not argument:
            raise ValueError("/load needs a file saved by /save, e.g. /load chat.kvb")
        path = Path(argument).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"/load {path}: no such file")
        state = snapshot.from_bytes(path.read_bytes())
        session = Chat.from_state(self.llm, state)
        self.session.close()
        self.session = session
        out.print(f"[dim]loaded {session.turn} turns from {escape(str(path))} "
                  f"({session.context_tokens:,} tokens in the KV cache)[/]")

    def show_memory(self) -> None:
        """/memory: the session's memory report, one figure per line."""
        report = self.session.memory()
        out.print(memory_bar(self.session))
        rows = [("weights", format_bytes(report.weights_bytes)),
                ("KV used / reserved", f"{format_bytes(report.kv_used_bytes)} / "
                                       f"{format_bytes(report.kv_reserved_bytes)} ({report.kv_dtype})"),
                ("tokens held / capacity", f"{report.tokens_held:,} / {report.capacity_tokens:,}"),
                ("tokens evicted / quantized / summarized",
                 f"{report.tokens_evicted:,} / {report.tokens_quantized:,} / {report.tokens_summarized:,}"),
                ("archive of evicted turns (for recall)", format_bytes(report.archive_bytes)),
                ("process RSS (peak)", f"{format_bytes(report.rss_bytes)} ({format_bytes(report.peak_rss_bytes)})")]
        for name, value in rows:
            out.print(f"[dim]{name}:[/] {value}")

    # -- a turn ---------------------------------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        """One streamed reply; an error or Ctrl-C ends the turn (the session rolls it back), never the chat."""
        session, started = self.session, False
        try:
            with contextlib.closing(session.stream(text, **self.params)) as pieces:
                for piece in pieces:
                    if not started:
                        out.print("[bold magenta]bot ›[/] ", end="")
                        started = True
                    write(piece)
        except KeyboardInterrupt:
            out.print("\n[yellow]reply interrupted; this turn was dropped[/]")
            return
        except (KvboundError, ValueError) as e:
            if started:
                out.print()
            err.print(f"[red]error:[/] {escape(one_line(e))}")
            return
        out.print("" if started else "[bold magenta]bot ›[/] [dim](empty reply)[/]")
        reply = session.last_reply
        out.print(f"[dim]{reply_status(reply, session.cache.capacity)}[/]")
        if (reason := cut_reason(reply, in_chat=True)) is not None:
            out.print(f"[yellow]{escape(reason)}[/]")
        out.print(memory_bar(session))
        for event in reply.mem_events:
            colour = "red" if event["kind"] == "critical" else "yellow"
            out.print(f"[{colour}]{event['kind']}:[/] {escape(event['message'])}")
        evicted = reply.receipt.get("evicted_tokens", 0)
        if evicted:
            out.print(f"[dim]this turn the cache evicted {evicted:,} tokens (policy {reply.receipt['policy']})[/]")
