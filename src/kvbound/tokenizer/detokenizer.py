"""Streaming detokenization: turns generated ids into text one token at a time without ever emitting a
broken UTF-8 character. Owns only the offsets of a small id window; the Tokenizer does the decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbound.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete byte sequence


class StreamDecoder:
    """Incremental decoder with the prefix-offset scheme of vLLM/TGI.

    Decoding single tokens is wrong twice over: a byte-level token may carry half of a UTF-8 character, and
    SentencePiece decoders change a token's leading space by position. So we decode a window
    `ids[prefix:]` and emit what it adds over `ids[prefix:read]` (text already emitted), holding back while
    the window ends in U+FFFD. Invariant: concatenated `push` outputs + `flush()` == `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer, self._skip_special = tokenizer, skip_special
        self._ids: list[int] = []  # only ids from the prefix offset on; older ones are never decoded again
        self._read = 0  # ids[:read] has been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became complete (often "", never a partial character)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[: self._read])
        new_text = self._decode(self._ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        # The window now starts where the last emitted text ended, on a character boundary.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back (an incomplete character comes out as U+FFFD); resets the decoder."""
        text = self._decode(self._ids)[len(self._decode(self._ids[: self._read])) :]
        self._ids, self._read = [], 0
        return text
