"""Sampling parameters (validated) and the next-token sampler: greedy, temperature, top-k/p, min-p, repetition.
A `json_schema` or `grammar` and a `logprobs` request are carried and checked here; the Decoder applies them
(engine/constraint.py, engine/logprobs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbound.engine.constraint import check_grammar, check_schema
from kvbound.engine.logprobs import MAX_TOP_LOGPROBS


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit (-inf bans it)
    # Only JSON this schema accepts (llguidance masks each step); the generation stops once the document is whole.
    json_schema: dict[str, Any] | None = None
    # Only text this Lark grammar (llguidance's dialect, %json sub-schemas included) accepts; not with json_schema.
    grammar: str | None = None
    # None: none computed. N (0-20): each generated token's logprob under the model's own distribution and the N
    # likeliest alternatives' (engine/logprobs.py), on Reply.logprobs.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the first bad option; with `vocab_size`, logit_bias ids must be below it."""
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p < 1.0, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0 (1 disables it)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(k, int) and k >= 0 for k in self.logit_bias), "logit_bias keys must be token ids"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        outside = sorted(k for k in self.logit_bias if vocab_size is not None and k >= vocab_size)
        if outside:
            raise ValueError(f"logit_bias names token {outside[0]}, outside the vocabulary of {vocab_size:,} tokens "
                             f"(ids 0 to {vocab_size - 1:,})")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                              and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS} (the alternatives "
                             f"reported per token), got {self.logprobs!r}")
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give json_schema or grammar, not both")
        if self.json_schema is not None:
            check_schema(self.json_schema)
        if self.grammar is not None:
            check_grammar(self.grammar)
        return self


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params.validate()
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: (V,) float32 of the next position; history: token ids seen so far (for repetition penalty)."""
        p = self.params
        if p.logit_bias:
            logits = logits.clone()
            for token, bias in p.logit_bias.items():
                if token < logits.numel():
                    logits[token] += bias
            if not torch.isfinite(logits).any():
                raise ValueError("logit_bias bans every token that may come next; ban fewer")
        if p.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), device=logits.device)
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = sorted_probs.cumsum(0)
            drop = cumulative - sorted_probs > p.top_p * cumulative[-1]  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sampling_params(vocab_size: int | None = None, **kwargs: Any) -> SamplingParams:
    """SamplingParams from keyword options, validated (logit_bias ids against `vocab_size` when given); TypeError
    names options it does not have."""
    unknown = set(kwargs) - set(SamplingParams.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    return SamplingParams(**kwargs).validate(vocab_size)
