"""Memory transparency: predict (estimate), account live (ledger), bound and warn (guard), read the OS and the
device (devices). Everything here reads byte counts from `kvcache.spec` / the built pools; nothing here owns a
tensor of the model or the cache."""

from kvbound.memory.devices import DeviceMemory, device_memory, peak_rss_bytes, rss_bytes, usage_bytes
from kvbound.memory.estimate import Estimate, estimate
from kvbound.memory.guard import (MemoryEvent, MemoryGuard, MemoryWarning, admit_turn, fitting_chunk,
                                  predict_turn_peak)
from kvbound.memory.ledger import Ledger, MemoryReport, ProcessMemory, process_memory

__all__ = ["Estimate", "estimate", "Ledger", "MemoryReport", "ProcessMemory", "process_memory", "MemoryEvent",
           "MemoryGuard", "MemoryWarning", "admit_turn", "predict_turn_peak", "fitting_chunk", "DeviceMemory",
           "device_memory", "usage_bytes", "rss_bytes", "peak_rss_bytes"]
