"""Memory transparency: predict (estimate), account live (ledger), bound and warn (guard), read the OS and the
device (devices). Everything here reads byte counts from `kvcache.spec` / the built pools; nothing here owns a
tensor of the model or the cache."""

from kvbound.memory.devices import DeviceMemory, device_memory, peak_rss_bytes, rss_bytes
from kvbound.memory.estimate import Estimate, estimate
from kvbound.memory.guard import MemoryEvent, MemoryGuard
from kvbound.memory.ledger import Ledger, MemoryReport

__all__ = ["Estimate", "estimate", "Ledger", "MemoryReport", "MemoryEvent", "MemoryGuard", "DeviceMemory",
           "device_memory", "rss_bytes", "peak_rss_bytes"]
