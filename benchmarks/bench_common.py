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


def train_small_ensemble(root: Any, expert: dict[str, Any] | None = None, k: int = 2, steps: int = 2,
                         name: str | None = None) -> str:
    """A real K-expert ensemble on the digits (data, experts, router, ensemble.json) trained for a few steps
    in this process: what the serving tests and benchmark sample from (cost does not depend on the weights).
    expert: ExpertConfig fields (default: a 1-block DiT of width 32). Returns the ensemble.json path."""
    from pathlib import Path

    from archipelago.config import ArchipelagoConfig
    from archipelago.data.prepare import prepare_data
    from archipelago.ensemble import write_ensemble
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    root = Path(root)
    cfg = ArchipelagoConfig()
    cfg.data.num_clusters = k
    dims = expert or {"hidden_size": 32, "depth": 1, "num_heads": 2}
    for key, val in {**dims, "steps": steps, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 100,
                     "log_every": 5}.items():
        setattr(cfg.expert, key, val)
    cfg.router.steps, cfg.router.batch_size, cfg.router.hidden_size, cfg.router.depth = 2, 16, 16, 1
    data = str(root / "data")
    prepare_data(cfg.data, data, progress=False)
    experts = {i: train_expert(cfg, i, data, str(root / f"expert-{i}"))["final_checkpoint"] for i in range(k)}
    router = train_router(cfg, data, str(root / "router"))["router"]
    ens = str(root / "ensemble.json")
    write_ensemble(ens, experts, router, data, cfg.config_hash(), name=name)
    return ens
