"""Terminal output shared by the commands: the two consoles, verbatim model text, and the one-line summaries of a
reply and of a session's memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from kvbound.kvcache.spec import format_bytes

if TYPE_CHECKING:
    from kvbound.chat.reply import Reply
    from kvbound.chat.session import Chat

# Rich must never rewrite model text: no line breaks of its own (soft_wrap), no ':name:' emoji, no highlighting.
out = Console(soft_wrap=True, highlight=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)


def write(text: str) -> None:
    """Model text and JSON go to stdout verbatim (not through rich markup), flushed so it streams."""
    out.file.write(text)
    out.file.flush()


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def reply_status(reply: "Reply", capacity: int | None = None) -> str:
    held = f"{reply.context_tokens:,}" + (f" / {capacity:,}" if capacity else "")
    what = "passage(s) of the prompt" if "spans" in reply.recall else "earlier turn(s)"
    recalled = (f" · recalled {reply.recall['passages']} {what}, {reply.recall['tokens']:,} tokens"
                if reply.recall.get("passages") else "")
    return (f"{held} tokens in context · KV {format_bytes(reply.kv_bytes)} · {reply.prompt_tokens:,} prompt + "
            f"{len(reply.token_ids):,} reply tokens · {reply.decode_tokens_per_s:.1f} tok/s{recalled}")


def cut_reason(reply: "Reply", in_chat: bool = False) -> str | None:
    """Why a reply stopped early, for a person: only a full KV cache needs saying."""
    if reply.finish_reason != "context_full":
        return None
    return (f"the reply was cut: the KV cache is full ({reply.context_tokens:,} tokens) and policy "
            f"'{reply.receipt.get('policy', 'none')}' cannot free room; raise --kv-budget, choose an evicting "
            "--policy (turns+keydiff, window, ...)" + (" or /reset" if in_chat else ""))


def budget_line(requested: int | None, session: "Chat") -> str:
    """What the budget became: the KV is reserved in whole blocks, so a budget rounds down to them."""
    cache = session.cache
    held = f"{format_bytes(cache.reserved_bytes)} usable, {cache.capacity:,} tokens"
    if requested is None:
        return f"KV cache {held}"
    return (f"KV budget {format_bytes(requested)} → {held} (whole blocks of {cache.spec.block_size} tokens, "
            f"{format_bytes(cache.spec.bytes_per_token)} per token)")


def memory_bar(session: "Chat", width: int = 30) -> str:
    """A one-line gauge of the session's KV use against its budget, with the process RSS and the forecast."""
    report = session.memory()
    budget = report.kv_budget_bytes or report.kv_reserved_bytes
    fraction = min(1.0, report.kv_used_bytes / budget) if budget else 0.0
    colour = "red" if fraction >= 0.95 else "yellow" if fraction >= 0.8 else "green"
    filled = round(fraction * width)
    return (f"[{colour}]{'█' * filled}[/][dim]{'░' * (width - filled)}[/] KV {format_bytes(report.kv_used_bytes)}"
            f" / {format_bytes(budget)} ({fraction:.0%}) · RSS {format_bytes(report.rss_bytes)} · "
            f"[dim]{escape(report.forecast)}[/]")
