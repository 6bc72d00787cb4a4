"""Fixtures for the orchestration tests: a tiny 2-shard digits dataset prepared once (with the eval
classifier cached inside it, so every pipeline copy reuses it), tiny pipeline configs, and one local Ray
instance per test module (2 logical CPUs, no dashboard)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from archipelago.config import ArchipelagoConfig

# K=2 shards of 8x8 digits; experts ~5k parameters, 10 steps; a router of 10 steps; 16 samples, 4 sampler steps.
TINY: dict[str, Any] = {
    "name": "orch-test",
    "data": {"image_size": 8, "num_clusters": 2, "seed": 0},
    "expert": {"hidden_size": 16, "depth": 1, "num_heads": 2, "patch_size": 2, "steps": 10, "batch_size": 16,
               "warmup_steps": 2, "checkpoint_every": 5, "log_every": 2, "sample_steps": 4, "seed": 0},
    "router": {"hidden_size": 8, "depth": 1, "steps": 10, "batch_size": 16},
    "islands": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1, "max_concurrent": 2},
    "inference": {"num_samples": 16, "routing": "top-1"},
    "tracking": {"enabled": True, "experiment": "orch-test"},
}


def tiny_config(root: Path, **sections: dict[str, Any]) -> ArchipelagoConfig:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    raw["storage"] = {"root": str(root)}
    return ArchipelagoConfig.model_validate(raw)


def write_config(path: Path, cfg: ArchipelagoConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory) -> Path:
    """<tmp>/data: the tiny data set, prepared once, with the eval classifier already trained and cached."""
    from archipelago.data.prepare import prepare_data
    from archipelago.eval.classifier import load_or_train_classifier

    root = tmp_path_factory.mktemp("orch-template")
    cfg = tiny_config(root)
    prepare_data(cfg.data, str(root / "data"), progress=False)
    load_or_train_classifier(str(root / "data"))
    return root / "data"


@pytest.fixture
def run_root(tmp_path, prepared_template) -> Path:
    """A fresh run root whose data/ is a copy of the template (prepare_data then reuses it)."""
    root = tmp_path / "run"
    shutil.copytree(prepared_template, root / "data")
    return root


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module: 2 logical CPUs, no dashboard."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def make_config():
    """tiny_config(root, **section_overrides) -> ArchipelagoConfig."""
    return tiny_config
