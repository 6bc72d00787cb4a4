"""The sampling progress bar: rank 0's StepFile counts steps, the launcher's bar follows it and ends full."""
from __future__ import annotations

import io
import threading
import time

from rich.console import Console

from archipelago.inference.progress import StepFile, new_step_file, read_steps, step_bar


def test_step_file_counts_and_the_bar_follows(tmp_path):
    path = new_step_file()
    assert read_steps(path) is None                     # nothing before rank 0's first step
    ticks = StepFile(path, 5)
    out = io.StringIO()

    def rank0():
        for k in range(5):
            ticks.tick(k)
            time.sleep(0.02)

    with step_bar(path, "sync_patch world=2", 5, Console(file=out, width=100), every_s=0.01):
        worker = threading.Thread(target=rank0)
        worker.start()
        worker.join()
        assert read_steps(path) == (5, 5)
    text = out.getvalue()
    assert text.startswith("sync_patch world=2") and " 5/5 " in text and text.endswith("\n")
    assert read_steps(path) is None                     # the launcher removes the file


def test_a_failed_launch_leaves_the_bar_where_rank_0_stopped(tmp_path):
    path = new_step_file()
    out = io.StringIO()
    try:
        with step_bar(path, "dualparal", 10, Console(file=out, width=100), every_s=0.01):
            StepFile(path, 10).tick()
            raise RuntimeError("rank 1 died")
    except RuntimeError:
        pass
    assert " 1/10 " in out.getvalue()
