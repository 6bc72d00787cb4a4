"""Helpers and shared artifacts of the robustness suite, built once per session in-process: a tiny K=2
digits data set (and a K=3 one: "other data"), two experts + a router + a valid ensemble.json on it, a wider
expert and a K=3 router/expert that do not belong to it. Every test copies what it corrupts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[2]

# 8x8 digits, K=2; experts hidden 32 / depth 2 (~40k parameters), 6 steps; router 6 steps.
TINY: dict[str, Any] = {
    "name": "robustness",
    "data": {"image_size": 8, "num_clusters": 2, "seed": 0},
    "expert": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "steps": 6, "batch_size": 16,
               "warmup_steps": 2, "checkpoint_every": 3, "log_every": 2, "sample_steps": 4, "seed": 0},
    "router": {"hidden_size": 8, "depth": 1, "steps": 6, "batch_size": 16},
    # Mechanism tests: every island trains at expert.batch_size whatever K (the K=3 "foreign" expert too).
    "islands": {"flop_match": "none"},
    "inference": {"num_samples": 8, "routing": "top-1"},
    "tracking": {"enabled": False},
}

# Secrets in the environment must never reach the environment of a case unless the case sets them.
_SCRUBBED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN",
                 "ARCHIPELAGO_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_raw(**sections: Any) -> dict[str, Any]:
    """TINY with sections merged in (a dict updates a section, anything else replaces the field)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def tiny_config(**sections: dict[str, Any]):
    from archipelago.config import ArchipelagoConfig

    return ArchipelagoConfig.model_validate(tiny_raw(**sections))


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without credentials / torchrun / debug variables, single-threaded, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "COLUMNS": "200"})
    env.update(extra or {})
    return env


def run_module(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], check=False, capture_output=True, text=True,
                          env=subprocess_env(env), timeout=timeout, cwd=cwd or REPO)


@dataclass
class Artifacts:
    root: Path
    config: Path          # tiny.yaml (storage.root = root/store)
    data: Path            # K=2 prepared data
    data3: Path           # K=3 prepared data of the same source (other manifest)
    experts: list[Path]   # final/ checkpoints of experts 0 and 1 on `data`
    expert_wide: Path     # shard 1 of `data`, hidden_size 48 (another size)
    expert_foreign: Path  # shard 1 of `data3`, same architecture (another manifest)
    router: Path          # K=2 router on `data`
    router3: Path         # K=3 router on `data3`
    ensemble: Path        # a valid ensemble.json (experts + router on `data`)
    expert_run: Path      # the run dir of expert 0 (checkpoints/ + final/)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    from archipelago.data.prepare import prepare_data
    from archipelago.ensemble import write_ensemble
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    root = tmp_path_factory.mktemp("robustness")
    cfg = tiny_config()
    config = root / "tiny.yaml"
    raw = tiny_raw(storage={"root": str(root / "store")})
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    data, data3 = root / "data", root / "data3"
    prepare_data(cfg.data, str(data), progress=False)
    cfg3 = tiny_config(data={"num_clusters": 3})
    prepare_data(cfg3.data, str(data3), progress=False)

    experts = []
    for k in (0, 1):
        res = train_expert(cfg, k, str(data), str(root / f"expert-{k}"))
        experts.append(Path(res["final_checkpoint"]))
    wide = train_expert(tiny_config(expert={"hidden_size": 48}), 1, str(data), str(root / "expert-wide"))
    foreign = train_expert(cfg3, 1, str(data3), str(root / "expert-foreign"))
    train_router(cfg, str(data), str(root / "router"))
    train_router(cfg3, str(data3), str(root / "router3"))
    write_ensemble(str(root / "ensemble.json"), [str(p) for p in experts], str(root / "router"), str(data),
                   config_hash=cfg.config_hash(), name="robustness")
    return Artifacts(root=root, config=config, data=data, data3=data3, experts=experts,
                     expert_wide=Path(wide["final_checkpoint"]), expert_foreign=Path(foreign["final_checkpoint"]),
                     router=root / "router", router3=root / "router3", ensemble=root / "ensemble.json",
                     expert_run=root / "expert-0")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
