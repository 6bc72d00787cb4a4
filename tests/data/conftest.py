"""Fixtures for the data tests: the digits source and its default embedding (computed once per session),
and a prepared dataset that tests copy before corrupting it."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from archipelago.config import DataConfig
from archipelago.data import SourceData, get_embedder, load_digits_source, prepare_data


@pytest.fixture(scope="session")
def digits() -> SourceData:
    return load_digits_source(16)


@pytest.fixture(scope="session")
def digits_emb(digits) -> np.ndarray:
    """Default pixel_pca features of the 16x16 digits, [1797, 32]."""
    return get_embedder("pixel_pca", DataConfig()).embed(digits.images)


@pytest.fixture(scope="session")
def _prepared_template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(DataConfig(num_clusters=4, seed=0), str(out), progress=False)
    return out


@pytest.fixture
def prepared(_prepared_template, tmp_path) -> Path:
    """A private copy of a prepared digits dataset (K=4), safe to corrupt."""
    dst = tmp_path / "data"
    shutil.copytree(_prepared_template, dst)
    return dst
