"""Crash consistency: SIGKILL a training process and a `data prepare` process at seeded random moments (and
on purpose while a checkpoint / shard is being written), then check what is on disk:

- training (`archipelago.experts.train`'s `main`, checkpoint_every=1): after every kill the newest checkpoint
  that `CheckpointManager.latest()` finds loads with `load_expert`, the latest step never goes backwards,
  and a final uninterrupted run resumes and finishes with every step logged exactly once;
- data prepare (the real CLI's `main`): after every kill there is either no manifest.json or one whose
  shards all verify (sha256 + parse), and a final run completes.

Each process runs the module's real entry point behind a stdin gate: the next process imports torch while
the current one works, so the kills cost seconds, not a fresh interpreter start each.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from robustness_support import REPO, copy_tree, subprocess_env, tiny_raw

pytestmark = pytest.mark.e2e

# The entry points of `python -m archipelago.experts.train` and `archipelago`, imported before the gate.
TRAIN_GATE = ("import sys; import archipelago.experts.train as t; sys.stdin.readline(); "
              "t._exit(t.main(sys.argv[1:]))")
PREPARE_GATE = ("import sys; import archipelago.data.prepare; from archipelago.cli import main; "
                "sys.stdin.readline(); sys.argv[0] = 'archipelago'; main()")


def _spawn(gate: str, args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")   # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-c", gate, *args], stdin=subprocess.PIPE, stdout=out,
                            stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
    proc._log = out  # type: ignore[attr-defined]
    return proc


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def _finish(proc: subprocess.Popen, kill: bool, timeout: float = 120) -> int:
    if kill and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=timeout)
    proc._log.close()  # type: ignore[attr-defined]
    return rc


def _writes_in_flight(root: Path) -> set[str]:
    """Marks of an unfinished write under root: *.tmp files, and step-*/final dirs without meta.json."""
    marks: set[str] = set()
    try:
        for path in root.rglob("*"):
            checkpoint_dir = path.name.startswith("step-") or path.name == "final"
            unfinished = checkpoint_dir and path.is_dir() and not (path / "meta.json").exists()
            if unfinished or path.name.endswith(".tmp"):
                marks.add(str(path))
    except FileNotFoundError:   # purge deleted something while we walked
        pass
    return marks


def _kill_when_writing(proc: subprocess.Popen, root: Path, before: set[str], timeout: float = 10) -> bool:
    """Poll until a write that was not in flight before appears, then SIGKILL at once; False if none did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _writes_in_flight(root) - before:
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0005)
    return False


@dataclass
class KillLog:
    kills: int = 0
    targeted: int = 0                   # kills fired while a new write was seen in flight
    interrupted_writes: int = 0         # kills that left a new unfinished write on disk
    completed_early: int = 0            # processes that finished before their kill
    complete_but_invalid: list[str] = field(default_factory=list)   # meta.json present, files not matching


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

TRAIN_STEPS = 60
TRAIN_KILLS = 12


@pytest.mark.timeout(300)
def test_sigkilled_training_always_leaves_a_loadable_latest_checkpoint(artifacts, tmp_path, record_property):
    from archipelago.errors import CheckpointError
    from archipelago.experts.checkpoint import CheckpointManager, load_expert, verify_checkpoint

    data = copy_tree(artifacts.data, tmp_path / "data")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(expert={"steps": TRAIN_STEPS, "checkpoint_every": 1, "log_every": 1,
                                                      "keep_checkpoints": 2, "warmup_steps": 2})))
    rng = random.Random(20240611)
    log = KillLog()
    series = 0

    def args() -> list[str]:
        return ["--config", str(config), "--shard", "0", "--data", str(data), "--out",
                str(tmp_path / f"run-{series}"), "--progress", "off"]

    nxt = _spawn(TRAIN_GATE, args(), tmp_path / "train.log")
    last_step = None
    while log.kills < TRAIN_KILLS:
        run = tmp_path / f"run-{series}"
        proc, before = nxt, _writes_in_flight(run)
        nxt = _spawn(TRAIN_GATE, args(), tmp_path / "train.log")     # warms up while `proc` trains
        _go(proc)
        targeted = log.kills % 3 == 2
        if targeted:
            log.targeted += _kill_when_writing(proc, run, before)
        else:
            time.sleep(rng.uniform(0.05, 0.9))
        rc = _finish(proc, kill=True)
        if rc == 0:   # it finished before the kill: start a fresh run so every kill hits a running job
            log.completed_early += 1
            series += 1
            last_step = None
            nxt.kill()
            _finish(nxt, kill=True)
            nxt = _spawn(TRAIN_GATE, args(), tmp_path / "train.log")
            continue
        assert rc == -signal.SIGKILL, (rc, (tmp_path / "train.log").read_text()[-3000:])
        log.kills += 1
        log.interrupted_writes += bool(_writes_in_flight(run) - before)

        # ---- the newest valid checkpoint loads; it never goes backwards ------------------------------
        manager = CheckpointManager(str(run), keep=2)
        latest = manager.latest()
        if latest is None:
            assert last_step is None, f"kill {log.kills}: checkpoint step {last_step} vanished"
        else:
            model, meta = load_expert(latest)
            step = int(meta["step"])
            assert latest.endswith(f"step-{step:08d}") and sum(p.numel() for p in model.parameters()) > 0
            assert last_step is None or step >= last_step, (last_step, step)
            last_step = step
        for s in manager.complete_steps():        # observed, not required: latest() skips these
            try:
                verify_checkpoint(manager.step_url(s))
            except CheckpointError:
                log.complete_but_invalid.append(f"kill {log.kills}: step {s}")

    # ---- an uninterrupted run resumes from whatever is there and finishes ------------------------------
    run = tmp_path / f"run-{series}"
    _go(nxt)
    assert _finish(nxt, kill=False) == 0, (tmp_path / "train.log").read_text()[-3000:]
    model, meta = load_expert(str(run / "final"))
    assert meta["step"] == TRAIN_STEPS and meta["final"] is True
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1)), steps      # every step logged once, in order
    print(f"training: {log}")
    assert log.kills >= TRAIN_KILLS and log.targeted >= 1 and log.interrupted_writes >= 1, log
    record_property("robustness: SIGKILLs survived (training)", log.kills)


# ----------------------------------------------------------------------------------------------------
# data prepare
# ----------------------------------------------------------------------------------------------------

PREPARE_KILLS = 8


@pytest.mark.timeout(300)
def test_sigkilled_data_prepare_never_leaves_a_manifest_that_lies(artifacts, tmp_path, record_property):
    from archipelago.data.shards import MANIFEST, verify_shards

    out = tmp_path / "data"
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump(tiny_raw()))
    rng = random.Random(7)
    log = KillLog()
    attempt = 0

    def args() -> list[str]:
        # A new seed each time: every run rebuilds over the previous run's (complete or partial) output.
        return ["data", "prepare", "--config", str(config), "--out", str(out), "--set", f"data.seed={attempt}"]

    nxt = _spawn(PREPARE_GATE, args(), tmp_path / "prepare.log")
    while log.kills < PREPARE_KILLS:
        proc, before = nxt, _writes_in_flight(out)
        attempt += 1
        nxt = _spawn(PREPARE_GATE, args(), tmp_path / "prepare.log")
        _go(proc)
        if log.kills % 3 == 2:
            log.targeted += _kill_when_writing(proc, out, before)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        rc = _finish(proc, kill=True)
        if rc == 0:
            log.completed_early += 1
        else:
            assert rc == -signal.SIGKILL, (rc, (tmp_path / "prepare.log").read_text()[-3000:])
            log.kills += 1
            log.interrupted_writes += bool(_writes_in_flight(out) - before)
        if (out / MANIFEST).exists():
            manifest = verify_shards(str(out))       # every shard present, sha256 and layout as listed
            assert len(manifest.shards) == 2
    _go(nxt)
    assert _finish(nxt, kill=False) == 0, (tmp_path / "prepare.log").read_text()[-3000:]
    manifest = verify_shards(str(out))
    assert manifest.data_config["seed"] == attempt
    print(f"data prepare: {log}")
    assert log.kills >= PREPARE_KILLS, log
    record_property("robustness: SIGKILLs survived (data prepare)", log.kills)
