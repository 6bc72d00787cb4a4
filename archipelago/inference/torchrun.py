"""The torchrun launcher of image and video inference: N ranks of a module's entry point in a
`torch.distributed.run --standalone` subprocess on this machine; a failure comes back as one line.

    run_torchrun("archipelago.inference", ["--spec-json", ...], world_size=2, timeout_s=600, what="generate")
"""
from __future__ import annotations

import os
import subprocess
import sys

from archipelago.errors import ArchipelagoError


def inside_torchrun(world_size: int) -> bool:
    """True when this process is already one rank of a torchrun job of world_size ranks."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == world_size


def run_torchrun(module: str, args: list[str], world_size: int, timeout_s: float, what: str) -> None:
    """Run `python -m module *args` on world_size ranks (one thread each unless OMP_NUM_THREADS says
    otherwise) and wait. ArchipelagoError with the first rank's `error:` line (else the output's tail) when
    a rank fails, or when no result comes within timeout_s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           "-m", module, *args]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ArchipelagoError(f"torchrun {what}: no result within {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        tail = errors[:1] or (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise ArchipelagoError(f"torchrun {what} failed (exit {proc.returncode}): " + " | ".join(tail))
