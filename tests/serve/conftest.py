"""One tiny trained ensemble for every serving test of a session (training it is most of their cost)."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_common import train_small_ensemble


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory) -> tuple[str, Path]:
    """(ensemble.json path, its data directory) of a tiny K=2 ensemble, trained once per session."""
    root = tmp_path_factory.mktemp("tiny-ensemble")
    return train_small_ensemble(root, name="tiny"), root / "data"
