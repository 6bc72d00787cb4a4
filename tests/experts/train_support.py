"""Helpers shared by the training-loop tests: one tiny prepared dataset, tiny configs, real launchers.

Not a conftest: the experts test package is shared with the model tests; these helpers are imported
explicitly by the test_train_* files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from archipelago.config import ArchipelagoConfig, DataConfig

REPO = Path(__file__).resolve().parents[2]

# 8x8 digits, 2 shards (~600 and ~1200 samples); expert: hidden 32, depth 2 (~70k parameters).
TINY_DATA = {"image_size": 8, "num_clusters": 2, "seed": 0}
TINY_EXPERT = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "steps": 20, "batch_size": 32,
               "warmup_steps": 3, "lr": 2e-3, "checkpoint_every": 10, "log_every": 1, "ema_decay": 0.9,
               "seed": 0}


def tiny_cfg(**expert: object) -> ArchipelagoConfig:
    return ArchipelagoConfig.model_validate({"name": "test-train", "data": TINY_DATA,
                                             "expert": {**TINY_EXPERT, **expert}})


def write_cfg(path: Path, cfg: ArchipelagoConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """URL of a prepared tiny digits dataset (written once per session; prepare_data reuses it)."""
    from archipelago.data.prepare import prepare_data

    out = tmp_path_factory.getbasetemp() / "train-data"
    prepare_data(DataConfig(**TINY_DATA), str(out), progress=False)
    return str(out)


def read_metrics(run: Path | str, tolerant: bool = False) -> list[dict]:
    """metrics.jsonl records; tolerant=True skips a line torn by a kill (the resumed run drops it)."""
    out = []
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if not tolerant:
                raise
    return out


def losses(run: Path | str) -> list[float]:
    return [m["loss"] for m in read_metrics(run)]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for training subprocesses: one thread per process (2 shared cores), CPU DeepSpeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::FutureWarning", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def train_cmd(cfg_path: Path, data: str, out: Path, *extra: str, nproc: int | None = None) -> list[str]:
    """`python -m archipelago.experts.train ...`, under `torch.distributed.run` when nproc is given."""
    args = ["-m", "archipelago.experts.train", "--config", str(cfg_path), "--shard", "0", "--data", data,
            "--out", str(out), "--progress", "off", *extra]
    if nproc is None:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
            *args]


def run_ok(cmd: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(),
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc
