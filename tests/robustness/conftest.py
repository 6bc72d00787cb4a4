"""Fixtures of the robustness tests. The helpers live in robustness_support.py; with pytest's importlib import
mode test directories are not on sys.path, so this directory is added for them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from robustness_support import artifacts  # noqa: F401 - the shared session fixture
