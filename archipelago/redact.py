"""Credentials never reach an error line or a log: the one function that removes them.

Its own module (not storage.py) because errors.py needs it and storage.py needs errors.py.
"""
from __future__ import annotations

import os

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_PASSWORD")


def redact(text: str) -> str:
    """Replace any credential value from the environment found in `text` (for error lines and logs)."""
    for name in SECRET_ENV:
        val = os.environ.get(name)
        if val and len(val) >= 4:
            text = text.replace(val, f"<{name}>")
    return text
