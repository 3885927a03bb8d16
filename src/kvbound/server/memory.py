"""The memory document: what `GET /v1/memory` returns (a dashboard polls it) and the figures /metrics exports. Built
on the engine worker from llm.memory(), the shared pool and each session's chat.memory(); changes nothing.

    {
      "process":  llm.memory(): weights_bytes, kv_reserved_bytes, kv_used_bytes, sessions, workspace_bytes,
                  rss_bytes, peak_rss_bytes, device_allocated_bytes, device_peak_allocated_bytes,
                  device_free_bytes, nvml_used_bytes
      "pool":     dtype, block_tokens, block_bytes, blocks, free_blocks, used_blocks, reserved_blocks (by turns
                  in progress), budget_bytes (the pool's tensors), used_bytes (used_blocks × block_bytes),
                  capacity_tokens
      "engine":   active (generations interleaved now), queued, peak_active, steps, offloads (sessions whose KV
                  was dropped for others, since start), decode: the batched decode forwards since start —
                  {forwards, tokens, mean_batch_size, max_batch_size, batch_sizes: {"B": forwards of B sequences}},
                  spill: offloaded sessions' KV on disk (server/spill.py) — {sessions, bytes, budget, directory,
                  written, restored, dropped} — or null when off
      "sessions": [{id, state (idle | answering | offloaded), explicit, turns, message_count, kv_tokens, kv_bytes,
                    offloads, created, last_used,
                    memory: chat.memory() (kv_reserved/used bytes, tokens held/evicted/quantized/summarized,
                            capacity, forecast, rss, device) or null while offloaded,
                    last_receipt: what the cache did in the last turn, or null; forecast: str or null}]
      "store":    the SessionStore of --data-dir (chat/persistence.py) — {path, file_bytes (database + WAL),
                  sessions, archive_entries, archive_bytes (the text of named sessions' recall archives, kept
                  there rather than in process: their memory's archive_stored_bytes)} — or null without one
    }
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbound.kvcache.pool import BlockPool
    from kvbound.llm import LLM
    from kvbound.server.admission import PoolAdmission
    from kvbound.server.scheduler import Worker
    from kvbound.server.sessions import SessionRegistry


def pool_figures(pool: "BlockPool", reserved_blocks: int = 0) -> dict[str, Any]:
    spec = pool.spec
    return {"dtype": spec.dtype, "block_tokens": spec.block_size, "block_bytes": spec.bytes_per_block,
            "blocks": pool.num_blocks, "free_blocks": pool.free_blocks, "used_blocks": pool.used_blocks,
            "reserved_blocks": reserved_blocks, "budget_bytes": pool.nbytes,
            "used_bytes": pool.used_blocks * spec.bytes_per_block,
            "capacity_tokens": pool.num_blocks * spec.block_size}


def memory_document(llm: "LLM", pool: "BlockPool", registry: "SessionRegistry", admission: "PoolAdmission",
                    worker: "Worker") -> dict[str, Any]:
    sessions = []
    for session in registry.sessions():
        detail = registry.detail(session)
        sessions.append({key: detail[key] for key in (
            "id", "state", "explicit", "turns", "message_count", "kv_tokens", "kv_bytes", "offloads", "created",
            "last_used", "memory", "last_receipt", "forecast")})
    return {"process": llm.memory().to_dict(), "pool": pool_figures(pool, admission.reserved_blocks),
            "engine": {"active": worker.active, "queued": worker.queued, "peak_active": worker.peak_active,
                       "steps": worker.steps, "offloads": registry.offloads_total,
                       "decode": decode_figures(worker.batch_sizes),
                       "spill": registry.spill.report() if registry.spill is not None else None},
            "sessions": sessions, "store": registry.store.report() if registry.store is not None else None}


def decode_figures(batch_sizes: dict[int, int]) -> dict[str, Any]:
    """What continuous batching did: forwards run, tokens they decoded, and how many forwards had B sequences."""
    forwards = sum(batch_sizes.values())
    tokens = sum(size * count for size, count in batch_sizes.items())
    return {"forwards": forwards, "tokens": tokens, "mean_batch_size": tokens / forwards if forwards else 0.0,
            "max_batch_size": max(batch_sizes, default=0),
            "batch_sizes": {str(size): batch_sizes[size] for size in sorted(batch_sizes)}}
