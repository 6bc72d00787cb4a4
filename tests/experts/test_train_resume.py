"""Kill -9 a real training process after its first periodic checkpoint, start it again, and the resumed
run must repeat the uninterrupted loss curve step for step (model, EMA, optimizer, LR step, RNG and data
position all restored)."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from train_support import REPO, child_env, losses, read_metrics, run_ok, tiny_cfg, train_cmd, write_cfg

from archipelago.experts.checkpoint import load_expert
from archipelago.experts.train import train_expert

pytestmark = pytest.mark.e2e

# Long enough that the process is still training when step 20's checkpoint appears (~5 ms per step).
CFG = {"steps": 150, "checkpoint_every": 20, "keep_checkpoints": 1}


def test_sigkill_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    cfg = tiny_cfg(**CFG)
    cfg_path = write_cfg(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "killed"
    marker = out / "checkpoints" / "step-00000020" / "meta.json"

    proc = subprocess.Popen(train_cmd(cfg_path, tiny_data, out), env=child_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err[-3000:]}"
    assert marker.exists() and not (out / "final").exists()
    killed_at = len(read_metrics(out, tolerant=True))  # the kill may have torn the last line
    assert 20 <= killed_at < CFG["steps"], killed_at

    resumed = run_ok(train_cmd(cfg_path, tiny_data, out))
    assert "resuming from" in resumed.stderr

    torch.set_num_threads(1)  # the subprocesses ran with OMP_NUM_THREADS=1: same kernels, same bits
    ref = tmp_path / "uninterrupted"
    train_expert(cfg, 0, tiny_data, str(ref))
    got, want = losses(out), losses(ref)
    assert [m["step"] for m in read_metrics(out)] == list(range(1, CFG["steps"] + 1)), "each step once"
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    a, _ = load_expert(str(out / "final"))
    b, _ = load_expert(str(ref / "final"))
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=1e-5, atol=1e-6)
