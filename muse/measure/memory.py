"""Warm peak device memory of a workload.

The workload runs once to warm up (allocator pools, autotuning, optimizer state), then the
peak counters are reset and it runs again: the second run's peak is what a long job sees.
Allocated bytes are what tensors hold; reserved bytes what the caching allocator took from the
driver. NVML (when nvidia-ml-py is present) is read once, after the second run, and is not a
peak: the memory used on the whole device by every process, and this process's own share
(CUDA context included) where NVML lists our pid — in a container it may list host pids only.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NVMLMemory:
    device_used_bytes: int  # every process on the device
    process_bytes: int | None  # this process; None when NVML does not list our pid


@dataclass(frozen=True)
class MemoryStats:
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml: NVMLMemory | None  # read after the run; None without nvidia-ml-py or NVML

    def describe(self) -> dict:
        """The figures beside the gated peak, each named for what it is."""
        return {
            "reserved_bytes": self.peak_reserved_bytes,
            "nvml_device_used_bytes_after": None if self.nvml is None
            else self.nvml.device_used_bytes,
            "nvml_process_bytes_after": None if self.nvml is None else self.nvml.process_bytes,
        }


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def nvml_memory(device: torch.device) -> NVMLMemory | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        ours = [
            p.usedGpuMemory
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == os.getpid()
        ]
    except pynvml.NVMLError:
        return None
    # usedGpuMemory is None where the driver cannot attribute memory (e.g. under MIG).
    return NVMLMemory(used, int(ours[0]) if ours and ours[0] is not None else None)


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
        nvml=nvml_memory(device),
    )
