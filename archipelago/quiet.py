"""A quiet terminal for long commands: Ray's, torchrun's and the workers' output goes to a log file, and the
terminal shows only what we draw on it (a live table or a progress bar, and the outputs).

The redirect is at the file-descriptor level, so it also catches what Python's `logging` cannot: Ray's log
monitor forwarding worker lines to the driver, C++ glog lines, and the child processes (a local Ray instance,
torchrun) that inherit stdout/stderr. `--verbose` skips all of this and shows everything as before.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from archipelago import storage


def log_path(root: str | None, command: str) -> Path:
    """Where `command`'s logs go: <root>/logs/ for a local run root, else the system temp directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if root and storage.is_local(root):
        base = Path(storage.local_path(root)) / "logs"
    else:
        base = Path(tempfile.gettempdir()) / "archipelago-logs"
    return base / f"{command}-{stamp}-{os.getpid()}.log"


@contextmanager
def quiet_output(path: Path) -> Iterator[tuple[Any, TextIO]]:
    """Send fd 1 and fd 2 (and so sys.stdout/sys.stderr, and every child process) to `path` until the block
    ends; yields (console, terminal): a rich Console on the real stdout, and the real stderr as a text file,
    for what the user should see."""
    from rich.console import Console

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    term_out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    term_err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield Console(file=term_out, highlight=False), term_err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        term_out.close()
        term_err.close()
