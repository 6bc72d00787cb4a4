"""Fixtures of the experts tests. The training-loop helpers live in train_support.py; with pytest's
importlib import mode test directories are not on sys.path, so this directory is added for them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_support import tiny_data  # noqa: F401 - the shared prepared-data fixture
