"""Continuous batching of decode steps: a generation asks for its next decode step instead of running it, and
whoever drives several generations (the server's worker) runs the asked steps of all of them as one forward.

Inside `decode_requests()`, `stream_tokens` yields a `DecodeRequest` at each decode point and reads the logits
from it when resumed; outside it (every ordinary caller of Chat.stream / LLM.stream_raw) nothing changes. The
switch is a context variable, not an argument, so those public iterators keep their signatures and only the
code that drives them inside the scope ever sees a request. A request nobody served (a consumer that skipped it,
or a batch that failed) runs alone when its generation resumes, so a missed batch costs speed, never a token.
Prefill is not batched here: it stays one sequence per forward.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator

import torch

from kvbound.errors import ContextOverflowError
from kvbound.kvcache.base import KVCache

if TYPE_CHECKING:
    from kvbound.engine.runner import Runner

logger = logging.getLogger("kvbound.engine")

_ASKING: ContextVar[bool] = ContextVar("kvbound_decode_requests", default=False)


@dataclass(eq=False)
class DecodeRequest:
    """One sequence's next decode step, waiting to be served: feed `token_id` into `cache` with `runner`."""

    runner: "Runner"
    token_id: int
    cache: KVCache
    logits: torch.Tensor | None = None  # (V,), set once served


@contextmanager
def decode_requests() -> Iterator[None]:
    """While active, generations advanced in this context yield a DecodeRequest at each decode step."""
    token = _ASKING.set(True)
    try:
        yield
    finally:
        _ASKING.reset(token)


def decode_step(runner: "Runner", token_id: int, cache: KVCache) -> Generator[DecodeRequest, None, torch.Tensor]:
    """`logits = yield from decode_step(...)`: the logits (V,) after `token_id`, computed now, or — inside
    `decode_requests()` — by whoever serves the yielded request."""
    if not _ASKING.get():
        return runner.decode(token_id, cache)
    request = DecodeRequest(runner, token_id, cache)
    yield request
    return request.logits if request.logits is not None else runner.decode(token_id, cache)


def serve(requests: list[DecodeRequest]) -> list[int]:
    """Serve `requests` with one forward per runner; returns the sizes of the batches that ran. A batch that
    fails (a cache full, the shared pool out of blocks) leaves its requests unserved: each then runs alone and
    meets its own error in its own generation, exactly as without batching."""
    groups: dict[int, list[DecodeRequest]] = {}
    for request in requests:
        groups.setdefault(id(request.runner), []).append(request)
    sizes = []
    for group in groups.values():
        try:
            logits = group[0].runner.decode_batch([r.token_id for r in group], [r.cache for r in group])  # (B, V)
        except ContextOverflowError:
            continue
        except Exception:  # noqa: BLE001 — a failed batch must not end the worker; alone, the error surfaces
            logger.warning("a decode batch of %d failed; its sequences decode alone", len(group), exc_info=True)
            continue
        for request, row in zip(group, logits):
            request.logits = row
        sizes.append(len(group))
    return sizes


def rounds(generations: list[Iterator[Any]], on_piece: Callable[[int, str], None] | None = None
           ) -> Iterator[list[int]]:
    """Run generations (stream_tokens, Chat.stream, LLM.stream_raw iterators) to their ends, one round per
    `next()`: every live generation advances to its next decode step (`on_piece(i, piece)` gets generation i's
    text on the way), then the round's steps are served by one forward; yields the sizes of the batches that
    ran. The server's worker does the same between its calls and cancels."""
    live = dict(enumerate(generations))
    while live:
        requests = []
        for i, pieces in list(live.items()):
            with decode_requests():
                for item in pieces:
                    if isinstance(item, DecodeRequest):
                        requests.append(item)
                        break
                    if on_piece is not None:
                        on_piece(i, item)
                else:
                    del live[i]
        yield serve(requests)


def drive(generations: list[Iterator[Any]], on_piece: Callable[[int, str], None] | None = None) -> list[int]:
    """Offline batch generation: `rounds` to the end; the sizes of every batch that ran."""
    return [size for sizes in rounds(generations, on_piece) for size in sizes]
