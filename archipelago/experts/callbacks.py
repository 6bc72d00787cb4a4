"""Hooks the island training loop calls, so progress bars, metric files and trackers (MLflow, Ray Train
reports) plug in from outside instead of being wired into the loop.

Every hook is called on **every** rank with identical arguments (the loss is already averaged over ranks):
a callback that must run on all workers (e.g. `ray.train.report`, which is a barrier) can, and one that
writes (progress bar, files, trackers) checks `info["rank"] == 0` itself, as the two below do.
"""
from __future__ import annotations

import json
import time
from typing import Any

from archipelago import storage


class TrainCallback:
    """Base class with no-op hooks; override the ones you need.

    on_start(info): once, before the first step. `info` keys: rank, world_size, strategy, start_step (0, or
        the resumed step), total_steps, out_url, config (ArchipelagoConfig), shard, model (the wrapped
        module being trained), ema (archipelago.experts.ema.EMA; `ema.shadow` is a plain model), lease
        (archipelago.lease.RunLease on rank 0, else None: `lease.lost` once a newer attempt took over).
    on_step(step, metrics): every `expert.log_every` optimizer steps and at the last one; `step` counts
        optimizer steps from 1; metrics: loss (mean over the steps since the last report and over ranks),
        lr, grad_norm (before clipping), samples_per_s (global samples per second of the loop, checkpoint
        time excluded), step_time_s (seconds per step over the same window).
    on_checkpoint(step, url): after a checkpoint is complete (meta.json written) and every rank has passed
        the barrier; `url` is the checkpoint directory.
    on_end(result): once, with the dict `train_expert` returns.
    """

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, url: str) -> None:
        pass

    def on_end(self, result: dict[str, Any]) -> None:
        pass


class JsonlMetricsCallback(TrainCallback):
    """Append one JSON line per report to `url` (rank 0 only): {"step": .., "loss": .., "lr": .., ...}.

    On start, lines with step > start_step are dropped: after a crash, steps that ran past the last
    checkpoint are re-run by the resumed job, and the file must show each step once. Local files are
    appended line by line (readable while training runs); other stores are rewritten whole at each
    checkpoint and at the end (object stores have no append).
    """

    def __init__(self, url: str):
        self.url = url
        self.rank = 0
        self.lease: Any = None      # the run's RunLease on rank 0 (info["lease"])
        self._lines: list[str] = []

    def on_start(self, info: dict[str, Any]) -> None:
        self.rank = int(info.get("rank", 0))
        self.lease = info.get("lease")
        if self.rank != 0:
            return
        start = int(info.get("start_step", 0))
        kept: list[str] = []
        if storage.exists(self.url):
            for line in storage.read_text(self.url).splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: drop it
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= start:
                    kept.append(line)
        self._lines = kept
        self._flush()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0 or (self.lease is not None and not self.lease.still_mine()):   # a stale attempt: no
            return
        line = json.dumps({"step": step, **metrics, "time": time.time()}, sort_keys=True)
        self._lines.append(line)
        if storage.is_local(self.url):
            with open(storage.local_path(self.url), "a") as fh:
                fh.write(line + "\n")

    def on_checkpoint(self, step: int, url: str) -> None:
        if self.rank == 0 and not storage.is_local(self.url):
            self._flush()

    def on_end(self, result: dict[str, Any]) -> None:
        if self.rank == 0 and not storage.is_local(self.url):
            self._flush()

    def _flush(self) -> None:
        storage.write_text(self.url, "".join(line + "\n" for line in self._lines))


class RichProgressCallback(TrainCallback):
    """A rich progress bar with loss / lr / samples per second, drawn on rank 0 only (stderr)."""

    def __init__(self, description: str = "train"):
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def on_start(self, info: dict[str, Any]) -> None:
        if int(info.get("rank", 0)) != 0:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"), console=Console(stderr=True))
        self._task = self._progress.add_task(
            self.description, total=info["total_steps"], completed=info.get("start_step", 0), stats="")
        self._progress.start()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        stats = (f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                 f"{metrics.get('samples_per_s', 0.0):.0f} samples/s")
        self._progress.update(self._task, completed=step, stats=stats)

    def on_end(self, result: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
