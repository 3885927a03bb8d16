"""Continuous batching of decode steps: whoever drives several decoders (the server's worker, `drive` offline)
feeds the waiting token of each in one forward per runner, and hands each decoder its row of logits.

A batch that fails (a cache full, the shared pool out of blocks) changes no cache (Runner.decode_batch commits
all or none); its decoders then step alone, so each meets its own error, exactly as without batching. Prefill is
not batched here: it stays one sequence per forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbound.engine.generate import Decoder
from kvbound.engine.logprobs import TokenLogprob
from kvbound.errors import ContextOverflowError

logger = logging.getLogger("kvbound.engine")


@dataclass(frozen=True)
class Outcome:
    """What one decoder's step produced: the text now safe to show (and its tokens' logprobs, when asked for), or
    the error that ended it."""

    piece: str = ""
    error: BaseException | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


def step(decoders: Sequence[Decoder]) -> tuple[list[Outcome], list[int]]:
    """One decode step of every (unfinished) decoder: the outcome of each, in order, and the sizes of the
    batched forwards that ran."""
    outcomes: dict[int, Outcome] = {}
    groups: dict[int, list[int]] = {}
    for i, decoder in enumerate(decoders):
        groups.setdefault(id(decoder.runner), []).append(i)
    sizes = []
    for members in groups.values():
        group = [decoders[i] for i in members]
        try:
            logits = group[0].runner.decode_batch([d.token for d in group], [d.cache for d in group])  # (B, V)
        except ContextOverflowError:
            logits = None
        except Exception:  # noqa: BLE001 — a failed batch must not end the others; alone, the error surfaces
            logger.warning("a decode batch of %d failed; its sequences decode alone", len(group), exc_info=True)
            logits = None
        if logits is not None:
            sizes.append(len(group))
        for k, i in enumerate(members):
            outcomes[i] = _feed(decoders[i], None if logits is None else logits[k])
    return [outcomes[i] for i in range(len(decoders))], sizes


def _feed(decoder: Decoder, row) -> Outcome:
    try:
        piece = decoder.feed(row) if row is not None else decoder.step()
        return Outcome(piece, logprobs=tuple(decoder.take_logprobs()))
    except Exception as e:  # noqa: BLE001 — the error belongs to this sequence only
        return Outcome(error=e)


def drive(decoders: Sequence[Decoder], on_piece: Callable[[int, str], None] | None = None) -> list[int]:
    """Offline batch generation: step every decoder until all are done; `on_piece(i, piece)` gets decoder i's
    text on the way. Returns the sizes of the batched forwards that ran; the first error is raised at the end."""
    sizes, errors = [], []
    live = [i for i, d in enumerate(decoders) if not d.done]
    while live:
        outcomes, ran = step([decoders[i] for i in live])
        sizes += ran
        for i, outcome in zip(live, outcomes):
            if outcome.error is not None:
                errors.append(outcome.error)
            elif outcome.piece and on_piece is not None:
                on_piece(i, outcome.piece)
        live = [i for i, o in zip(live, outcomes) if o.error is None and not decoders[i].done]
    if errors:
        raise errors[0]
    return sizes
