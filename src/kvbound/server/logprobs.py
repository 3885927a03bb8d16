"""OpenAI's logprobs objects from the engine's TokenLogprobs (engine/logprobs.py: the model's own log-softmax, before
sampling changes anything): a chat choice's `{"content": [...], "refusal": null}` and a text completion's four lists.
Knows the tokenizer only to spell tokens: their text and bytes."""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbound.engine.logprobs import TokenLogprob
    from kvbound.tokenizer import Tokenizer

FLOOR = -9999.0  # what OpenAI reports for a probability too small to have a finite log


class LogprobFormat:
    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer

    def spell(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and bytes; a token holding part of a UTF-8 character reads `bytes:\\xe2\\x80` (as
        OpenAI writes it), its bytes joining the next tokens' into the character."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.spell(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    def chat(self, entries: Sequence["TokenLogprob"]) -> dict[str, Any]:
        """A chat choice's (or stream chunk's) `logprobs`: every token with its `top_logprobs` alternatives."""
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in e.top]} for e in entries],
                "refusal": None}

    def completion(self, entries: Sequence["TokenLogprob"], offset: int = 0) -> dict[str, Any]:
        """A text completion's `logprobs`: tokens, their logprobs, per token the alternatives (with the sampled
        token among them: up to logprobs + 1, as OpenAI) and each token's character offset in the completion's text,
        counting from `offset` (the text streamed before these tokens; echo is not supported, so the prompt is not
        counted)."""
        tokens, offsets = [], []
        characters = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # a character counts once it is whole
        for entry in entries:
            offsets.append(offset)
            tokens.append(self.spell(entry.token_id)[0])
            offset += len(characters.decode(self.tokenizer.token_bytes(entry.token_id)))
        top = []
        for entry, text in zip(entries, tokens):
            alternatives = {self.spell(i)[0]: _finite(lp) for i, lp in entry.top}
            top.append({**alternatives, text: _finite(entry.logprob)})
        return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": top,
                "text_offset": offsets}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR
