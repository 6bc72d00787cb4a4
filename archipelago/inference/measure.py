"""What a rank measures about itself, for image and video inference alike: resident memory (current and
peak since a reset), the peak a run added on its device, and the bytes of the weights it holds. Latency and
traffic come from `time.perf_counter` between device syncs and from `Comm`."""
from __future__ import annotations

import os
import resource

import torch
from torch import nn


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (peak RSS since start or the last reset), falling back to ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (after it dropped what other ranks run)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakMemory:
    """Peak memory a run adds: on a GPU torch's allocator peak, on the CPU the RSS high-water mark above
    the RSS at `start()` (the process's own baseline, so one rank's number does not include the others')."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss0 = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss0 = rss_bytes()
        reset_peak_rss()

    def peak_rss(self) -> int:
        """Peak RSS of the whole process since `start()`."""
        return peak_rss_bytes()

    def added(self) -> int:
        """Peak bytes the run added: allocator peak on a GPU, peak RSS minus the start RSS on the CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(peak_rss_bytes() - self.rss0, 0)
