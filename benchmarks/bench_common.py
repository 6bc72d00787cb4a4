"""Shared by the benchmarks: what the machine was (numbers mean nothing without it), and writing the report."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch


def machine(device: str = "cpu") -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu": cpu or platform.processor(), "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_at_start": os.getloadavg(), "device": device,
            "backend": "nccl" if device == "cuda" else "gloo",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(out: str, report: dict[str, Any]) -> None:
    """The JSON under benchmarks/results/ (written whole: no half report if the run dies while writing)."""
    import json
    from pathlib import Path

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    tmp.replace(path)
    print(f"\nwrote {out}")
