"""One progress bar for a sampling job that runs in other processes (torchrun ranks, spawned ranks, Ray
actors): rank 0 writes how many steps it finished to a small local file, the launching process polls it.

A file, not a queue, because it works the same for every launcher without touching the launch plumbing.
Ray actors on another node write to that node's disk: there the bar jumps from 0 to done at the end.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class StepFile:
    """Rank 0's side: `tick()` after every step writes "<done> <total>" atomically (write + rename)."""

    def __init__(self, path: str, total: int):
        self.path, self.total, self.done = path, total, 0

    def tick(self, *_: Any) -> None:
        self.done += 1
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{self.done} {self.total}")
        os.replace(tmp, self.path)


def read_steps(path: str) -> tuple[int, int] | None:
    """(done, total) from a StepFile, None before rank 0's first step."""
    try:
        with open(path) as fh:
            done, total = fh.read().split()
        return int(done), int(total)
    except (OSError, ValueError):
        return None


def new_step_file() -> str:
    fd, path = tempfile.mkstemp(prefix="archipelago-steps-", suffix=".txt")
    os.close(fd)
    os.unlink(path)    # rank 0 creates it at its first step
    return path


@contextmanager
def step_bar(path: str, description: str, total: int, console: Any, every_s: float = 0.2) -> Iterator[None]:
    """Draw one rich progress bar on `console` while the block runs, fed from the StepFile at `path`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task(description, total=total)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            steps = read_steps(path)
            if steps is not None:
                progress.update(task, completed=steps[0], total=steps[1])

    thread = threading.Thread(target=poll, name="archipelago-step-bar", daemon=True)
    progress.start()
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        steps = read_steps(path)
        if steps is not None:
            progress.update(task, completed=steps[0], total=steps[1])
        if ok:
            progress.update(task, completed=progress.tasks[0].total)
        progress.stop()
        try:
            os.unlink(path)
        except OSError:
            pass


def run_with_bar(launch: Callable[[str | None], T], description: str, total: int, verbose: bool,
                 command: str, echo: Callable[[str], None]) -> T:
    """`launch(step_file)` under one progress bar, every other output in a log file whose path is echoed;
    verbose: `launch(None)` with everything on the console, as before."""
    from archipelago.quiet import log_path, quiet_output

    if verbose:
        return launch(None)
    logs = log_path(None, command)
    echo(f"logs: {logs} (--verbose shows them here)")
    path = new_step_file()
    with quiet_output(logs) as (console, _), step_bar(path, description, total, console):
        return launch(path)
