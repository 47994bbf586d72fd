"""Warm peak device memory of a workload.

The workload runs once to warm up (allocator pools, autotuning, optimizer state), then the
peak counters are reset and it runs again: the second run's peak is what a long job sees.
Allocated bytes are what tensors hold; reserved bytes what the caching allocator took from the
driver; NVML's figure (when nvidia-ml-py is present) is the whole process as the driver sees it,
CUDA context included.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryStats:
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml_used_bytes: int | None


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def nvml_used_bytes(device: torch.device) -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except pynvml.NVMLError:
        return None


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> MemoryStats:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"peak memory is read from the CUDA caching allocator; device {device} has none"
        )
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return MemoryStats(
        peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
        peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
        nvml_used_bytes=nvml_used_bytes(device),
    )
