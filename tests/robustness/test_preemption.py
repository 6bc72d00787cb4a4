"""Preemption: a spot node's SIGTERM at a seeded random moment makes `python -m archipelago.experts.train`
checkpoint the step it was on and exit with the distinct status 75; the next run resumes at exactly the
next step. After a dozen such interruptions the finished expert is bit-identical to one trained without
any: no step was lost or run twice, and the RNG, optimizer and EMA states all came back.

The processes start behind a stdin gate (as in test_crash_consistency.py): the next one imports torch
while the current one trains.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from robustness_support import REPO, copy_tree, subprocess_env, tiny_raw

pytestmark = pytest.mark.e2e

GATE = ("import sys; import archipelago.experts.train as t; print('ready', flush=True); sys.stdin.readline(); "
        "t._exit(t.main(sys.argv[1:]))")
STEPS = 60
SIGTERMS = 10
LINE = re.compile(r"^preempted: expert 0 \(.*\): SIGTERM; step (\d+) checkpointed ([0-9.]+)s after the signal "
                  r"\((.*)\); run the same command to resume at step (\d+) \(exit 75\)$")


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", GATE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(log, "wb"), env=subprocess_env(), cwd=REPO)


def _go(proc: subprocess.Popen) -> None:
    """Start the imported process (a SIGTERM during `import torch` would only find Python's default handler)."""
    assert proc.stdout.readline().strip() == b"ready"
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.002)
    raise AssertionError(f"step {step} never logged (rc={proc.poll()})")


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_and_resume_loses_no_step(artifacts, tmp_path, record_property):
    from archipelago.config import ArchipelagoConfig
    from archipelago.experts.checkpoint import CheckpointManager, read_tensors
    from archipelago.experts.train import train_expert

    data = copy_tree(artifacts.data, tmp_path / "data")
    raw = tiny_raw(expert={"steps": STEPS, "checkpoint_every": 10_000, "log_every": 1, "warmup_steps": 5,
                           "batch_size": 8})
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    args = ["--config", str(config), "--shard", "0", "--data", str(data), "--out", str(run), "--progress", "off"]
    rng = random.Random(20261129)

    terms, latencies, resumed_at, i = 0, [], [], 0
    expect_start = 0
    nxt = _spawn(args, tmp_path / "log-0")
    while terms < SIGTERMS:
        proc, log = nxt, tmp_path / f"log-{i}"
        i += 1
        nxt = _spawn(args, tmp_path / f"log-{i}")
        _go(proc)
        # a seeded random moment inside the loop: once step start + k has been logged, 0-50 ms later
        _wait_for_step(run, proc, expect_start + rng.randint(1, 4))
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        text = log.read_text()
        assert rc == 75, (rc, text[-3000:])
        terms += 1
        m = re.search(r"resuming from .*step-(\d+) \(step (\d+)\)", text)
        start = int(m.group(2)) if m else 0
        assert start == expect_start, (f"run {i} resumed at {start}, the previous one checkpointed {expect_start}",
                                       text[-3000:])
        resumed_at.append(start)
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        got = LINE.match(last)
        assert got, text[-3000:]
        step, latency, url, next_step = int(got.group(1)), float(got.group(2)), got.group(3), int(got.group(4))
        assert step > start and next_step == step + 1 and step < STEPS, last
        assert latency < 25.0
        latencies.append(latency)
        assert CheckpointManager(str(run)).latest() == url            # what the next run will resume from
        assert not (run / "final").exists()
        expect_start = step

    # ---- the last run finishes; it must equal an uninterrupted run, bit for bit ---------------------------
    _go(nxt)
    assert nxt.wait(timeout=120) == 0, (tmp_path / f"log-{i}").read_text()[-3000:]
    cfg = ArchipelagoConfig.model_validate(raw)
    ref = train_expert(cfg, 0, str(data), str(tmp_path / "reference"))
    for name in ("ema.safetensors", "model.safetensors"):
        got_t = read_tensors(str(run / "final"), name, json.loads((run / "final" / "meta.json").read_text()))
        ref_t = read_tensors(ref["final_checkpoint"], name,
                             json.loads((Path(ref["final_checkpoint"]) / "meta.json").read_text()))
        for k in ref_t:
            assert torch.equal(got_t[k], ref_t[k]), (name, k)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))                           # every step once: none lost, none twice
    record_property("robustness: SIGTERMs checkpointed and resumed (0 steps lost)", terms)
    print(f"SIGTERM -> checkpoint latency: max {max(latencies):.3f}s, median "
          f"{sorted(latencies)[len(latencies) // 2]:.3f}s over {terms}; resumed at {resumed_at}")
