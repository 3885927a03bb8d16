"""What the operating system and the accelerator say about this process's memory: RSS and peak RSS (psutil,
getrusage), CUDA allocator figures (torch.cuda) and the device's own view (NVML via nvidia-ml-py when installed).
Every function returns plain ints and is safe to call without CUDA. Owns no tensors."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import psutil
import torch


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes(current: int | None = None) -> int:
    """Highest resident set size this process has reached (ru_maxrss: KiB on Linux, bytes on macOS). The kernel
    updates its high-water mark lazily, so the RSS of this instant (`current`, read now if not given) can be above
    it: take the larger."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(int(peak if sys.platform == "darwin" else peak * 1024), rss_bytes() if current is None else current)


def usage_bytes(device: torch.device | str = "cpu") -> int:
    """What a memory budget counts on `device`: the process RSS on CPU, torch's allocated bytes on CUDA."""
    device = torch.device(device)
    return device_memory(device).allocated_bytes if device.type == "cuda" else rss_bytes()


@dataclass(frozen=True)
class DeviceMemory:
    """One device's figures; all zero for the CPU (its memory is the process RSS)."""

    device: str
    allocated_bytes: int = 0  # torch tensors alive now (the caching allocator's count)
    peak_allocated_bytes: int = 0  # torch.cuda.max_memory_allocated since start or the last reset
    reserved_bytes: int = 0  # held by torch's caching allocator (allocated + cached free blocks)
    free_bytes: int = 0  # free on the device, all processes considered (cudaMemGetInfo)
    total_bytes: int = 0
    nvml_used_bytes: int = 0  # the driver's count for the whole device (NVML), 0 without nvidia-ml-py


def device_memory(device: torch.device | str = "cpu") -> DeviceMemory:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return DeviceMemory(device=str(device))
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(
        device=str(device), allocated_bytes=int(torch.cuda.memory_allocated(index)),
        peak_allocated_bytes=int(torch.cuda.max_memory_allocated(index)),
        reserved_bytes=int(torch.cuda.memory_reserved(index)), free_bytes=int(free), total_bytes=int(total),
        nvml_used_bytes=_nvml_used(index))


def _nvml_used(index: int) -> int:
    try:
        import pynvml  # nvidia-ml-py: optional
    except ImportError:
        return 0
    # NVML numbers devices ignoring CUDA_VISIBLE_DEVICES; the UUID names the same device in both.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    try:
        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None
                      else pynvml.nvmlDeviceGetHandleByIndex(index))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0
