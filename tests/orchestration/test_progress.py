"""The live island table reads the islands' own reports (metrics.jsonl), ignores lines of earlier runs, and
shows each island's step/steps, loss, samples/s, ETA and status; outcomes override what the files say."""
from __future__ import annotations

import io
import json
import time

from rich.console import Console

from archipelago.orchestration.progress import IslandBoard, LiveBoard, last_report


def _report(path, step, loss, when, step_time=0.5, sps=64.0):
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "loss": loss, "samples_per_s": sps, "step_time_s": step_time,
                             "lr": 1e-3, "time": when}) + "\n")


def _text(board: IslandBoard) -> str:
    out = io.StringIO()
    Console(file=out, width=120).print(board.render())
    return out.getvalue()


def test_rows_follow_the_reports_and_the_outcomes(tmp_path):
    board = IslandBoard()
    for k in (0, 1):
        (tmp_path / f"expert-{k}").mkdir()
        board.add_island(f"island-{k}", k, 100, str(tmp_path / f"expert-{k}"))
    board.add_router(50)
    _report(tmp_path / "expert-1" / "metrics.jsonl", 90, 9.0, board.started - 60)   # an earlier run's line
    board.poll()
    rows = board.rows
    assert rows["island-0"].status == rows["island-1"].status == "waiting"

    _report(tmp_path / "expert-0" / "metrics.jsonl", 40, 0.4321, board.started + 1, step_time=0.5, sps=123.4)
    (tmp_path / "expert-0" / "metrics.jsonl").open("a").write('{"step": 42, "lo')   # a line cut mid-write
    board.poll()
    r0 = rows["island-0"]
    assert (r0.status, r0.step, r0.loss, r0.samples_per_s) == ("training", 40, 0.4321, 123.4)
    assert r0.eta_s == 30.0                                         # 60 steps left at 0.5 s/step
    text = _text(board)
    assert "step/steps" in text and "samples/s" in text and "ETA" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("island-0"))
    assert line.split() == ["island-0", "0", "40/100", "0.4321", "123", "30s", "training"]

    board.finish("island-0", "trained", 100, 0.25)
    board.finish("island-1", "failed")
    _report(tmp_path / "expert-0" / "metrics.jsonl", 60, 0.3, board.started + 2)   # late line: the outcome wins
    board.poll()
    text = _text(board)
    assert next(ln for ln in text.splitlines() if ln.startswith("island-0")).split()[2:] == \
        ["100/100", "0.2500", "123", "-", "trained"]
    assert next(ln for ln in text.splitlines() if ln.startswith("island-1")).split()[-1] == "FAILED"
    assert next(ln for ln in text.splitlines() if ln.startswith("router")).split()[-1] == "training"


def test_last_report_of_a_missing_file_is_none(tmp_path):
    assert last_report(str(tmp_path / "nope.jsonl"), 0.0) is None


def test_live_board_draws_the_final_table_once_on_a_non_terminal(tmp_path):
    out = io.StringIO()
    board = IslandBoard()
    board.add_island("island-0", 0, 10, str(tmp_path))
    with LiveBoard(board, Console(file=out, width=120), every_s=0.05) as live:
        live.start()
        live.echo("data: K=1")
        _report(tmp_path / "metrics.jsonl", 5, 1.0, time.time())
        time.sleep(0.3)
        board.finish("island-0", "trained", 10, 0.5)
    text = out.getvalue()
    assert text.startswith("data: K=1\n") and text.count("step/steps") == 1 and text.endswith("\n")
    assert "trained" in text
