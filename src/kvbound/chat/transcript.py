"""What a chat has said and fed, as plain data (a snapshot saves it beside the KV), and the template delta: which
tokens a new turn adds to what the cache already holds, so a turn never re-prefills the history."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbound.tokenizer import Tokenizer


@dataclass
class Transcript:
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation as the user sees it
    # What the template renders: replies exactly as generated (special tokens included), so the rendered history
    # stays a prefix of the next turn's rendering and only the new text is tokenized.
    history: list[dict[str, str]] = field(default_factory=list)
    turn: int = 0
    turn_text: dict[int, str] = field(default_factory=dict)  # turn → "User: ...\nAssistant: ..." (for summaries)
    summary: str = ""  # the newest note about evicted turns (policy `summarize`)
    summarized: set[int] = field(default_factory=set)
    unsummarized: set[int] = field(default_factory=set)  # evicted while the last summary was written
    pending_note: str = ""  # a note the next turn feeds, pinned as its own segment
    note_segment: int | None = None
    fed_ids: list[int] = field(default_factory=list)  # every token fed to the cache, in order
    fed_text: str = ""  # the rendered text those tokens spell
    shared_prefix_tokens: int = 0  # system-prompt tokens found in a shared pool, not computed

    @classmethod
    def with_system(cls, system: str | None) -> "Transcript":
        messages = [{"role": "system", "content": system}] if system else []
        return cls(messages=messages, history=list(messages))


def system_ids(tokenizer: Tokenizer, messages: list[dict[str, str]], rendered: str) -> list[int]:
    """Tokens of the system prompt alone, when the rendered conversation starts with it (segment 0)."""
    if not messages or messages[0]["role"] != "system":
        return []
    prefix = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False)
    if not rendered.startswith(prefix):
        return []
    ids = tokenizer.encode(prefix)
    return ids if tokenizer.encode(rendered)[: len(ids)] == ids else []


def delta(tokenizer: Tokenizer, log: Transcript, rendered: str, evicted: bool) -> tuple[list[int], int]:
    """Token ids to feed for `rendered`, and how many already-fed tokens stay valid.

    The fast path tokenizes only the text appended since the last turn. If the template rewrote earlier text
    (some trim or reformat past messages), fall back to the longest common token prefix; with tokens `evicted`
    (they cannot be fed again) keep the cache as it is and feed the text past the common prefix."""
    if rendered.startswith(log.fed_text):
        if not log.fed_text:
            prefix = system_ids(tokenizer, log.messages, rendered)
            if prefix:  # the system prompt is tokenized on its own so it can be its own segment
                return prefix + tokenizer.encode(rendered[len(tokenizer.decode(prefix)):]), 0
        return tokenizer.encode(rendered[len(log.fed_text):]), len(log.fed_ids)
    if evicted:
        return tokenizer.encode(rendered[_common(rendered, log.fed_text):]), len(log.fed_ids)
    full = tokenizer.encode(rendered)
    return full[_common(full, log.fed_ids):], _common(full, log.fed_ids)


def turn_record(user: str, reply: str) -> str:
    """How a finished turn is kept for summaries and the recall archive: both sides, labelled."""
    return f"User: {user}\nAssistant: {reply}"


def user_words(record: str) -> str:
    """The user's side of a `turn_record` (up to the first reply label: a reply may hold anything)."""
    return record.removeprefix("User: ").partition("\nAssistant: ")[0]


def blocks(tokenizer: Tokenizer, log: Transcript, extras: list[list[dict[str, str]]], rendered: str
           ) -> tuple[list[list[int]], str] | None:
    """Token ids of each extra message list (a note, recalled text) rendered after the history, and the text up to
    the last; None unless each is a clean append that the full rendering `rendered` starts with."""
    done, messages, out = log.fed_text, list(log.history), []
    for extra in extras:
        messages = messages + extra
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        if not text.startswith(done) or not rendered.startswith(text):
            return None
        out.append(tokenizer.encode(text[len(done):]))
        done = text
    return out, done


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
