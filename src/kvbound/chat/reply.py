"""What one turn (or raw completion) returns to its caller."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbound.engine.logprobs import TokenLogprob


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # tokens prefilled this turn (the new ones only)
    context_tokens: int  # tokens held in the KV cache after the turn
    kv_bytes: int  # bytes of KV data held after the turn
    elapsed_s: float
    finish_reason: str
    ttft_s: float = 0.0  # time to first token (the prefill)
    decode_tokens_per_s: float = 0.0
    reprefilled_tokens: int = 0  # history tokens fed again because the template rewrote earlier text
    receipt: dict[str, Any] = field(default_factory=dict)  # what the KV cache did this turn (see Receipt)
    mem_events: list[dict[str, Any]] = field(default_factory=list)  # thresholds crossed this turn
    forecast: str = ""  # "≈N more turns until the KV budget is full ..."
    recall: dict[str, Any] = field(default_factory=dict)  # recalled text this turn: turns, passages, tokens
    # with the logprobs sampling option: each token of `text` with its logprob and the likeliest alternatives'
    logprobs: "list[TokenLogprob] | None" = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
