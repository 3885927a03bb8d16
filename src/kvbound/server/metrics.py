"""Prometheus metrics of one app, in its own CollectorRegistry (no process-global state): counters and histograms
updated as turns end and requests finish, and gauges read from the memory document at scrape time.

    kvbound_requests_total{route,status}      kvbound_generated_tokens_total
    kvbound_evicted_tokens_total              kvbound_quantized_tokens_total     kvbound_summarized_tokens_total
    kvbound_memory_events_total{level}        kvbound_session_offloads_total
    kvbound_spill_bytes                       kvbound_spill_restores_total       kvbound_store_bytes
    kvbound_ttft_seconds (histogram)          kvbound_decode_tokens_per_second (histogram)
    kvbound_kv_budget_bytes                   kvbound_kv_bytes_used              kvbound_session_kv_bytes{session}
    kvbound_sessions{state}                   kvbound_active_sessions            kvbound_queued_requests
    kvbound_process_rss_bytes                 kvbound_weights_bytes
    kvbound_device_allocated_bytes            kvbound_device_free_bytes
    kvbound_decode_batch_size (histogram: sequences per batched decode forward, read from the memory document)
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from kvbound.chat.reply import Reply
    from kvbound.memory.guard import MemoryEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SESSION_STATES = ("idle", "answering", "offloaded")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvbound_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.generated = Counter("kvbound_generated_tokens", "Tokens generated", registry=r)
        self.evicted = Counter("kvbound_evicted_tokens", "KV tokens evicted by the sessions' policies", registry=r)
        self.quantized = Counter("kvbound_quantized_tokens", "KV tokens stored quantized", registry=r)
        self.summarized = Counter("kvbound_summarized_tokens", "Tokens written into summaries of evicted turns",
                                  registry=r)
        self.memory_events = Counter("kvbound_memory_events", "Memory threshold crossings and refusals",
                                     ["level"], registry=r)
        self.ttft = Histogram("kvbound_ttft_seconds", "Time to first token (the prefill) per turn",
                              buckets=TTFT_BUCKETS, registry=r)
        self.decode_rate = Histogram("kvbound_decode_tokens_per_second", "Decode speed per turn",
                                     buckets=RATE_BUCKETS, registry=r)
        self._document: dict[str, Any] = {}
        r.register(_MemoryGauges(self))

    def observe_reply(self, reply: "Reply") -> None:
        """A turn or completion ended (called on the engine worker; prometheus_client is thread-safe)."""
        self.generated.inc(len(reply.token_ids))
        receipt = reply.receipt or {}
        self.evicted.inc(receipt.get("evicted_tokens", 0))
        self.quantized.inc(receipt.get("quantized_tokens", 0))
        self.summarized.inc(receipt.get("summarized_tokens", 0))
        self.ttft.observe(reply.ttft_s)
        if reply.decode_tokens_per_s > 0:
            self.decode_rate.observe(reply.decode_tokens_per_s)

    def on_memory_event(self, event: "MemoryEvent") -> None:
        self.memory_events.labels(event.kind).inc()

    def render(self, document: dict[str, Any]) -> bytes:
        """The exposition text, with the gauges read from `document` (server.memory.memory_document)."""
        self._document = document
        return generate_latest(self.registry)

    @property
    def document(self) -> dict[str, Any]:
        """The memory document of the scrape in progress (the last one given to `render`; empty before any)."""
        return self._document


class _MemoryGauges:
    """A collector of the gauges that describe memory now (from the last memory document)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are known only once a document exists; nothing to check up front

    def collect(self) -> Iterator[Metric]:
        doc = self.metrics.document
        if not doc:
            return
        pool, process, engine, sessions = doc["pool"], doc["process"], doc["engine"], doc["sessions"]

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help, value=value)

        yield gauge("kvbound_kv_budget_bytes", "Bytes of the shared KV pool (preallocated)", pool["budget_bytes"])
        yield gauge("kvbound_kv_bytes_used", "Bytes of the pool's blocks that hold tokens", pool["used_bytes"])
        per_session = GaugeMetricFamily("kvbound_session_kv_bytes", "KV bytes each session holds", labels=["session"])
        for s in sessions:
            per_session.add_metric([s["id"]], s["kv_bytes"])
        yield per_session
        states = Tally(s["state"] for s in sessions)
        by_state = GaugeMetricFamily("kvbound_sessions", "Sessions by state", labels=["state"])
        for state in SESSION_STATES:
            by_state.add_metric([state], states.get(state, 0))
        yield by_state
        yield gauge("kvbound_active_sessions", "Sessions answering a request now", states.get("answering", 0))
        yield gauge("kvbound_queued_requests", "Generations waiting for a slot", engine["queued"])
        yield CounterMetricFamily("kvbound_session_offloads", "Sessions whose KV was dropped to make room",
                                  value=engine["offloads"])
        yield batch_size_histogram(engine["decode"])
        spill = engine.get("spill") or {}
        yield gauge("kvbound_spill_bytes", "Bytes of offloaded sessions' KV on disk", spill.get("bytes", 0))
        yield CounterMetricFamily("kvbound_spill_restores", "Offloaded sessions brought back from the spill "
                                  "without a prefill", value=spill.get("restored", 0))
        yield gauge("kvbound_store_bytes", "Bytes of the session store's file and WAL (--data-dir), recall "
                    "archives included", (doc.get("store") or {}).get("file_bytes", 0))
        yield gauge("kvbound_process_rss_bytes", "Resident set size of the server process", process["rss_bytes"])
        yield gauge("kvbound_weights_bytes", "Bytes of the model's weights", process["weights_bytes"])
        yield gauge("kvbound_device_allocated_bytes", "CUDA bytes allocated by torch (0 on CPU)",
                    process["device_allocated_bytes"])
        yield gauge("kvbound_device_free_bytes", "CUDA bytes free on the device (0 on CPU)",
                    process["device_free_bytes"])


def batch_size_histogram(decode: dict[str, Any]) -> HistogramMetricFamily:
    """The worker's tally of batch sizes (engine.decode of the memory document) as a cumulative histogram."""
    sizes = {int(size): count for size, count in decode["batch_sizes"].items()}
    buckets = [(str(float(b)), sum(c for s, c in sizes.items() if s <= b)) for b in BATCH_BUCKETS]
    buckets.append(("+Inf", sum(sizes.values())))
    return HistogramMetricFamily("kvbound_decode_batch_size", "Sequences per batched decode forward",
                                 buckets=buckets, sum_value=decode["tokens"])
