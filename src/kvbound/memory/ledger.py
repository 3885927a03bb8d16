"""Live accounting: per chat session, KV reserved/used (the pool's real tensor bytes), tokens held / evicted /
quantized / summarized from the cache's receipts and a forecast of how many more turns fit; per process, weights,
every live pool once, RSS and device figures. Reads caches and the OS; changes nothing."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from kvbound.memory import devices

FORECAST_TURNS = 3  # the forecast's turn size is the mean of this many latest turns


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int
    kv_reserved_bytes: int  # the session's pool + residual window: allocated up front, the most KV can take
    kv_used_bytes: int  # bytes of the blocks that hold tokens now (= cache.nbytes)
    kv_dtype: str
    kv_budget_bytes: int | None
    tokens_held: int
    tokens_evicted: int  # since the session began
    tokens_quantized: int
    tokens_summarized: int
    capacity_tokens: int
    activation_peak_bytes: int  # the largest predicted step peak among the turns recorded (0 if none given)
    rss_bytes: int
    peak_rss_bytes: int
    device_allocated_bytes: int  # CUDA: torch's allocated bytes now; 0 on CPU
    device_free_bytes: int  # CUDA: free on the device; 0 on CPU
    turns_left_forecast: int | None  # None: no turn yet, or an evicting cache that is full
    forecast: str
    archive_bytes: int = 0  # the archive of evicted turns kept for recall (outside the KV): its SQLite pages in process
    archive_stored_bytes: int = 0  # its text in a SessionStore's file instead (the index there adds as much again)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ledger:
    """Running totals of one session; the Chat calls `record_turn` after each turn with the cache's receipt."""

    def __init__(self, kv_budget_bytes: int | None = None):
        self.kv_budget_bytes = kv_budget_bytes
        self.turns = 0
        self.tokens_evicted = self.tokens_quantized = self.tokens_summarized = 0
        self.activation_peak_bytes = 0
        self._turn_sizes: deque[int] = deque(maxlen=FORECAST_TURNS)

    def record_turn(self, tokens_added: int, receipt: dict[str, Any], activation_peak_bytes: int = 0) -> None:
        """One finished turn: `tokens_added` (message + reply tokens fed to the cache) and its receipt
        (kvcache.sequence.Receipt as a dict)."""
        self.turns += 1
        self._turn_sizes.append(max(0, int(tokens_added)))
        self.tokens_evicted += int(receipt.get("evicted_tokens", 0))
        self.tokens_quantized += int(receipt.get("quantized_tokens", 0))
        self.tokens_summarized += int(receipt.get("summarized_tokens", 0))
        self.activation_peak_bytes = max(self.activation_peak_bytes, int(activation_peak_bytes))

    @property
    def turn_sizes(self) -> tuple[int, ...]:
        """Tokens added by each of the latest turns (at most FORECAST_TURNS), oldest first: the forecast's input."""
        return tuple(self._turn_sizes)

    TOTALS = ("turns", "tokens_evicted", "tokens_quantized", "tokens_summarized", "activation_peak_bytes")

    def totals(self) -> dict[str, Any]:
        """The running totals as plain data (a saved session carries them), the forecast's turn sizes included."""
        return {**{name: getattr(self, name) for name in self.TOTALS}, "turn_sizes": list(self._turn_sizes)}

    def restore(self, totals: dict[str, Any]) -> None:
        """Continue a saved session's totals and forecast (`totals()` of the original)."""
        for name in self.TOTALS:
            setattr(self, name, int(totals[name]))
        self._turn_sizes.clear()
        self._turn_sizes.extend(max(0, int(size)) for size in totals["turn_sizes"])

    @property
    def turn_size(self) -> float | None:
        """Mean tokens added per turn over the latest turns (None before the first)."""
        return sum(self._turn_sizes) / len(self._turn_sizes) if self._turn_sizes else None

    def forecast(self, free_tokens: int, policy: str, evicts: bool) -> tuple[int | None, str]:
        size = self.turn_size
        if size is None or size <= 0:
            return None, "no turn yet: the forecast starts after the first reply"
        turns = int(free_tokens // size)
        if evicts and turns == 0:
            return None, f"budget full; evicting per policy {policy}"
        then = f"; then policy {policy} evicts" if evicts else "; then a turn is refused (policy none)"
        return turns, (f"≈{turns} more turns until the KV budget is full at the current turn size "
                       f"(~{size:.0f} tokens){then}")

    def report(self, llm: Any, cache: Any, archive_bytes: int = 0, archive_stored_bytes: int = 0) -> MemoryReport:
        reserved = cache.reserved_bytes
        device = devices.device_memory(llm.device)
        turns_left, text = self.forecast(cache.capacity - cache.num_tokens, cache.policy.name, cache.policy.evicts)
        return MemoryReport(
            weights_bytes=llm.model.weights_bytes(), kv_reserved_bytes=reserved,
            kv_used_bytes=cache.nbytes, kv_dtype=cache.spec.dtype, kv_budget_bytes=self.kv_budget_bytes,
            tokens_held=cache.num_tokens, tokens_evicted=self.tokens_evicted, tokens_quantized=self.tokens_quantized,
            tokens_summarized=self.tokens_summarized, capacity_tokens=cache.capacity,
            activation_peak_bytes=self.activation_peak_bytes, rss_bytes=(rss := devices.rss_bytes()),
            peak_rss_bytes=devices.peak_rss_bytes(rss), device_allocated_bytes=device.allocated_bytes,
            device_free_bytes=device.free_bytes, turns_left_forecast=turns_left, forecast=text,
            archive_bytes=archive_bytes, archive_stored_bytes=archive_stored_bytes)


@dataclass(frozen=True)
class ProcessMemory:
    weights_bytes: int
    kv_reserved_bytes: int  # every live pool once (shared pools are shared), residual windows included
    kv_used_bytes: int  # blocks holding tokens, over all live caches
    sessions: int
    workspace_bytes: int  # the pools' gather/dequantize scratch allocated so far
    rss_bytes: int
    peak_rss_bytes: int
    device_allocated_bytes: int
    device_peak_allocated_bytes: int
    device_free_bytes: int
    nvml_used_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def process_memory(llm: Any, caches: Iterable[Any]) -> ProcessMemory:
    """The process's figures with `caches` (the live sessions' caches) counted, each pool once."""
    caches = list(caches)
    pools = {id(c.pool): c.pool for c in caches}.values()
    residual = sum(c.spec.residual_bytes for c in caches)
    device = devices.device_memory(llm.device)
    return ProcessMemory(
        weights_bytes=llm.model.weights_bytes(),
        kv_reserved_bytes=sum(p.nbytes for p in pools) + residual, kv_used_bytes=sum(c.nbytes for c in caches),
        sessions=len(caches), workspace_bytes=sum(p.workspace_bytes for p in pools), rss_bytes=(rss := devices.rss_bytes()),
        peak_rss_bytes=devices.peak_rss_bytes(rss), device_allocated_bytes=device.allocated_bytes,
        device_peak_allocated_bytes=device.peak_allocated_bytes, device_free_bytes=device.free_bytes,
        nvml_used_bytes=device.nvml_used_bytes)
