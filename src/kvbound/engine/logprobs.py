"""Log-probabilities of generated tokens: what the model itself gave each token — the log-softmax of its raw logits
at that step, before logit_bias, a grammar's mask, the repetition penalty, temperature and top-k/top-p/min-p —
for the sampled token and the likeliest alternatives. This is what vLLM reports by default and llama.cpp with
`post_sampling_probs=false`: a property of the model and the text, the same whichever way the token was chosen.
Computed only for generations that ask (SamplingParams.logprobs); owns no model or cache state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log of the model's probability of this token at its step
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the likeliest tokens, likeliest first


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` under `logits` (V,) — the model's raw logits of its step — and the `top` likeliest."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))  # sorted, likeliest first
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
