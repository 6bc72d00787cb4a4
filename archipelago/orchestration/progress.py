"""What a person watches while the islands train: one live table, one row per island and one for the router.

The rows are fed from the islands' own reports: rank 0 of every island appends a line to its
`<out>/metrics.jsonl` every `expert.log_every` steps (the same file MLflow reads), wherever the island runs
(a Ray Train job here, a Ray job on a cluster of its own); a poller thread reads the last line of each.
Outcomes (trained / skipped / failed) come from the pipeline as islands finish. The table knows nothing of
Ray: it reads files and is told outcomes, so it can be tested with plain files.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from archipelago import storage


@dataclass
class Row:
    """One line of the table; `status` is waiting, training, or the island's outcome."""
    name: str
    shard: str
    total_steps: int | None
    metrics_url: str | None = None
    status: str = "waiting"
    step: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    step_time_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        if self.status != "training" or None in (self.step, self.total_steps, self.step_time_s):
            return None
        return max(0, self.total_steps - self.step) * self.step_time_s


def last_report(url: str, since: float) -> dict[str, Any] | None:
    """The newest line of a metrics.jsonl written after `since` (a re-run's older lines do not count)."""
    try:
        if not storage.exists(url):
            return None
        lines = storage.read_text(url).splitlines()
    except Exception:   # noqa: BLE001 - a file being written or an unreachable store: try again next poll
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue   # a line cut mid-write
        if isinstance(rec, dict) and "step" in rec:
            return rec if float(rec.get("time", 0.0)) >= since else None
    return None


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


class IslandBoard:
    """The live table of a training run. `add_island` / `add_router` declare rows, `poll` reads the reports,
    `finish` records an outcome, `render` returns a rich Table (no box: greppable lines)."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.started = time.time()
        self._lock = threading.Lock()

    def add_island(self, name: str, shard: int, total_steps: int, out_url: str) -> None:
        with self._lock:
            self.rows[name] = Row(name, str(shard), total_steps, storage.join(out_url, "metrics.jsonl"))

    def add_router(self, total_steps: int) -> None:
        with self._lock:
            self.rows["router"] = Row("router", "-", total_steps, None, status="training")

    def poll(self) -> None:
        for row in list(self.rows.values()):
            if row.metrics_url is None or row.status not in ("waiting", "training"):
                continue
            rec = last_report(row.metrics_url, self.started)
            if rec is None:
                continue
            with self._lock:
                if row.status not in ("waiting", "training"):   # its outcome arrived meanwhile
                    continue
                row.status = "training"
                row.step = int(rec["step"])
                row.loss = _num(rec.get("loss"))
                row.samples_per_s = _num(rec.get("samples_per_s"))
                row.step_time_s = _num(rec.get("step_time_s"))

    def finish(self, name: str, status: str, steps: int | None = None, loss: float | None = None) -> None:
        with self._lock:
            row = self.rows.get(name)
            if row is None:
                return
            row.status = status
            if steps is not None:
                row.step = steps
            if loss is not None:
                row.loss = loss

    def render(self) -> Any:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        if not self.rows:
            return Text("preparing data ...")
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col, justify in (("island", "left"), ("shard", "right"), ("step/steps", "right"), ("loss", "right"),
                             ("samples/s", "right"), ("ETA", "right"), ("status", "left")):
            table.add_column(col, justify=justify, no_wrap=True)
        with self._lock:
            for r in self.rows.values():
                steps = f"{'-' if r.step is None else r.step}/{'-' if r.total_steps is None else r.total_steps}"
                table.add_row(r.name, r.shard, steps, "-" if r.loss is None else f"{r.loss:.4f}",
                              "-" if r.samples_per_s is None else f"{r.samples_per_s:.0f}", _fmt_eta(r.eta_s),
                              r.status.upper() if r.status == "failed" else r.status)
        return table


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


class LiveBoard:
    """Draws an IslandBoard with rich.Live on `console`, polling the reports every `every_s` seconds.

    Use as a context manager; `echo(line)` prints a line above the table (stage lines of the pipeline)."""

    def __init__(self, board: IslandBoard, console: Any, every_s: float = 1.0):
        self.board, self.console, self.every_s = board, console, every_s
        self._stop = threading.Event()
        self._live: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start drawing (once the rows are declared)."""
        from rich.live import Live

        if self._live is not None:
            return
        self._live = Live(self.board.render(), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()
        self._thread = threading.Thread(target=self._run, name="archipelago-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.board.poll()
            self._live.update(self.board.render())

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.board.render())

    def echo(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:
            self.board.poll()
            self._live.update(self.board.render())
            self._live.stop()
            self._live = None
            if not self.console.is_terminal:   # rich ends a drawn table with a newline only on a terminal
                self.console.line()

    def __enter__(self) -> LiveBoard:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
