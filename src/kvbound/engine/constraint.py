"""Structured output: a JSON schema or a Lark grammar as a mask over each step's logits, computed by llguidance (the
constraint engine of llama.cpp and vLLM; kvbound writes no grammar engine of its own). `check_schema` and
`check_grammar` validate one before any work; a `Constraint` is one generation's place in it. Owns no model or cache
state; llguidance is imported only when a generation asks for a constraint."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from kvbound.errors import KvboundError
from kvbound.tokenizer import Tokenizer

# No free whitespace and the separators models mostly write: a small model given room to pad a document with
# spaces or newlines can do so until max_tokens. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}

# llguidance's view of a tokenizer's vocabulary (every token's bytes, its end-of-text ids): ~0.25 s to build for a
# 49k vocabulary, so built once per Tokenizer and dropped with it.
_VOCABS: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise KvboundError("structured output (json_schema, grammar) needs the llguidance package; install it with "
                           "pip install 'kvbound[serve]' (or pip install llguidance)") from None
    return llguidance


def check_schema(schema: Any) -> str:
    """The llguidance grammar of a JSON schema given as a dict; ValueError naming what is wrong with it."""
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON schema object (a dict), got {type(schema).__name__}")
    matcher = _llguidance().LLMatcher
    try:
        grammar = matcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:  # not serializable as JSON
        raise ValueError(f"json_schema is not a valid JSON schema: {e}") from None
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"json_schema is not a valid JSON schema: {' '.join(messages[0].split())}")
    return grammar


def check_grammar(lark: Any) -> str:
    """The llguidance grammar of a Lark grammar in llguidance's dialect (`%json {...}` sub-schemas, `&` and `~` in
    terminals: https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md); ValueError naming the fault."""
    if not isinstance(lark, str) or not lark.strip():
        raise ValueError("grammar must be the text of a Lark grammar (with a 'start:' rule)")
    matcher = _llguidance().LLMatcher
    grammar = matcher.grammar_from_lark(lark)
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"grammar is not a valid Lark grammar: {' '.join(messages[0].split())}")
    return grammar


def _vocabulary(tokenizer: Tokenizer) -> Any:
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = _llguidance().LLTokenizer(
            tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.stop_ids))
    return vocab


class Constraint:
    """Where one generation stands in a grammar (from `check_schema` or `check_grammar`): `mask` the logits of the
    next step to the tokens the grammar allows, `advance` on the token sampled, and `complete` once the text is
    whole (nothing but an end-of-text token may follow). `what` names the option in errors."""

    def __init__(self, grammar: str, tokenizer: Tokenizer, what: str = "grammar"):
        self._matcher = _llguidance().LLMatcher(_vocabulary(tokenizer), grammar, log_level=0)
        self.what = what
        if self._matcher.is_error():
            raise ValueError(f"{what} cannot be used with this model's tokenizer: {self._matcher.get_error()}")

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (V,) with every token the grammar does not allow next set to -inf (a new tensor)."""
        # The mask is built in numpy: one torch op per step, not four (each a parallel region on a busy CPU).
        allowed = np.frombuffer(self._matcher.compute_logit_bias(), dtype=np.uint8)  # (V_tok,): 200 allowed, 0 not
        banned = np.ones(logits.numel(), dtype=bool)  # (V,): ids past the tokenizer's vocabulary stay banned
        n = min(allowed.size, logits.numel())
        banned[:n] = allowed[:n] == 0
        return logits.masked_fill(torch.from_numpy(banned).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            # Only a token outside the mask fails: every allowed token was banned (logit_bias) before sampling.
            raise ValueError(f"token {token} does not continue the text the {self.what} allows; was every token it "
                             "allows next banned by logit_bias?")

    @property
    def complete(self) -> bool:
        return self._matcher.is_stopped()


class JsonConstraint(Constraint):
    """Only JSON documents a schema accepts."""

    def __init__(self, schema: dict[str, Any], tokenizer: Tokenizer):
        super().__init__(check_schema(schema), tokenizer, what="json_schema")


class GrammarConstraint(Constraint):
    """Only text a Lark grammar (llguidance's dialect) accepts."""

    def __init__(self, lark: str, tokenizer: Tokenizer):
        super().__init__(check_grammar(lark), tokenizer, what="grammar")
