"""The machine under the bench: what it is, how busy it was, peak memory.

Contract: plain readings of the OS and torch, each returning None (or
leaving a field out) where the platform cannot tell: `machine_description`
(CPU, cores, versions, device), `cpu_sample` / `cpu_contention` (the share of
CPU capacity used by us, by other processes and stolen by a hypervisor
between two samples), `peak_rss_bytes`, and `reset_peak_memory` /
`run_peak_memory` around one run. Knows nothing about models or decoding.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

try:
    import resource  # POSIX only
except ImportError:  # Windows: no getrusage; peak memory and CPU shares are left out
    resource = None  # type: ignore[assignment]


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info


def cpu_sample() -> dict | None:
    """The machine's busy and steal CPU seconds (/proc/stat) and this process's CPU seconds, now."""
    if resource is None:
        return None
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    values = [int(v) / ticks for v in fields]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": time.perf_counter(),
        "busy": user + nice + system + irq + softirq,
        "steal": steal,
        "self": usage.ru_utime + usage.ru_stime,
    }


def cpu_contention(before: dict | None, after: dict | None, cores: int) -> dict | None:
    """Shares of the machine's CPU capacity used by other processes, by us, and stolen (VM), between samples."""
    if not before or not after:
        return None
    capacity = (after["wall"] - before["wall"]) * max(cores, 1)
    if capacity <= 0:
        return None
    ours = after["self"] - before["self"]
    busy = after["busy"] - before["busy"]
    return {
        "ours": ours / capacity,
        "others": max(0.0, busy - ours) / capacity,
        "steal": (after["steal"] - before["steal"]) / capacity,
    }


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far (getrusage maxrss; KiB on Linux, bytes on macOS)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_cuda_bytes(device: torch.device) -> int | None:
    """CUDA's peak allocated bytes on `device` since its last reset; None off CUDA."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak counters: CUDA's, and Linux's VmHWM (via /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def run_peak_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak RSS since reset_peak_memory, peak CUDA bytes since it) where measurable."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        rss = None
    return rss, peak_cuda_bytes(device)
