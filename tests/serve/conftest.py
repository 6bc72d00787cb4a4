"""One tiny trained ensemble for every serving test of a session (training it is most of their cost)."""
from __future__ import annotations

from pathlib import Path

import pytest

from archipelago.config import ArchipelagoConfig


def make_tiny_ensemble(root: Path, steps: int = 2, name: str | None = None) -> str:
    """A real 2-expert ensemble (digits, a 1-block DiT, a few steps): data, experts, router, ensemble.json."""
    from archipelago.data.prepare import prepare_data
    from archipelago.ensemble import write_ensemble
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    cfg = ArchipelagoConfig()
    cfg.data.num_clusters = 2
    for key, val in {"hidden_size": 32, "depth": 1, "num_heads": 2, "steps": steps, "batch_size": 16,
                     "warmup_steps": 1, "checkpoint_every": 100, "log_every": 5}.items():
        setattr(cfg.expert, key, val)
    cfg.router.steps, cfg.router.batch_size, cfg.router.hidden_size, cfg.router.depth = 2, 16, 16, 1
    data = str(root / "data")
    prepare_data(cfg.data, data, progress=False)
    experts = {k: train_expert(cfg, k, data, str(root / f"expert-{k}"))["final_checkpoint"] for k in range(2)}
    router = train_router(cfg, data, str(root / "router"))["router"]
    ens = str(root / "ensemble.json")
    write_ensemble(ens, experts, router, data, cfg.config_hash(), name=name)
    return ens


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> tuple[str, Path]:
    """(ensemble.json path, its data directory) of a tiny K=2 ensemble, trained once per session."""
    root = tmp_path_factory.mktemp("tiny-ensemble")
    return make_tiny_ensemble(root, name="tiny"), root / "data"
