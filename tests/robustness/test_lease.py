"""One writer per run directory, with real processes on one --out:

- a second live trainer (local disk, and S3 on a moto server with conditional writes) stops at once with
  one line naming the holder, writing nothing; the first finishes with every metrics line once;
- the zombie case: attempt 1 is frozen (SIGSTOP, as a partitioned node), its short lease expires, attempt 2
  takes over, resumes from attempt 1's last checkpoint and finishes; attempt 1, thawed, is fenced off at its
  next checkpoint (one line, exit 2) and publishes nothing; the final checkpoint is attempt 2's and
  verifies; a checkpoint a stale attempt committed anyway (forged here: the window between its check and
  its write) is never picked by a reader.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from robustness_support import REPO, copy_tree, subprocess_env, tiny_raw

pytestmark = pytest.mark.e2e

GATE = ("import sys; import archipelago.experts.train as t; print('ready', flush=True); sys.stdin.readline(); "
        "t._exit(t.main(sys.argv[1:]))")


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", GATE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(log, "wb"), env=subprocess_env(env), cwd=REPO)   # noqa: SIM115
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        assert proc.poll() is None, f"process ended (rc={proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(path: Path) -> list[int]:
    try:
        return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _args(config: Path, data: str, out: str) -> list[str]:
    return ["--config", str(config), "--shard", "0", "--data", data, "--out", out, "--progress", "off"]


def _second_trainer_is_refused(config: Path, data: str, out: str, progress, tmp: Path, env=None) -> None:
    """Trainer A runs; once it has logged a step, trainer B on the same out gets one line naming A."""
    a = _spawn(_args(config, data, out), tmp / "a.log", env)
    b = _spawn(_args(config, data, out), tmp / "b.log", env)
    _go(a)
    _wait_for(progress, a, what="trainer A's first steps")
    _go(b)
    rc_b = b.wait(timeout=120)
    text_b = (tmp / "b.log").read_text()
    err_b = [ln for ln in text_b.splitlines() if ln.startswith("error: ")]
    assert rc_b == 2 and len(err_b) == 1, text_b
    assert "resuming" not in text_b and "checkpoint" not in text_b.replace(err_b[0], ""), text_b
    line = err_b[0]
    assert "another trainer is writing this run" in line and f"pid {a.pid}" in line and "attempt 1" in line, line
    assert a.wait(timeout=240) == 0, (tmp / "a.log").read_text()[-3000:]


def test_second_live_trainer_gets_one_line_naming_the_holder(artifacts, tmp_path, record_property):
    data = copy_tree(artifacts.data, tmp_path / "data")
    config = tmp_path / "train.yaml"
    # long enough that A is still training while B starts, even on a loaded machine
    config.write_text(yaml.safe_dump(tiny_raw(expert={"steps": 150, "log_every": 1, "checkpoint_every": 50})))
    out = tmp_path / "run"
    _second_trainer_is_refused(config, str(data), str(out), lambda: len(_logged_steps(out / "metrics.jsonl")) >= 2,
                               tmp_path)
    assert _logged_steps(out / "metrics.jsonl") == list(range(1, 151))    # every line once: one writer
    meta = json.loads((out / "final" / "meta.json").read_text())
    assert meta["fencing_token"] == 1 and sorted(os.listdir(out / "lease")) == ["attempt-00000001.json"]
    record_property("robustness: concurrent writers refused", 1)


def test_second_live_trainer_on_s3_gets_one_line_naming_the_holder(artifacts, s3_env, tmp_path, record_property):
    import s3fs

    from archipelago import storage

    data = f"{s3_env}/data"
    storage.upload_dir(artifacts.data, data)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(expert={"steps": 150, "log_every": 1, "checkpoint_every": 50})))
    out = f"{s3_env}/run"
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
    held = lambda: fs.exists(f"{out[5:]}/checkpoints/step-00000001/meta.json") or fs.invalidate_cache()
    _second_trainer_is_refused(config, data, out, held, tmp_path, env)
    fs.invalidate_cache()
    assert fs.ls(f"{out[5:]}/lease", detail=False) == [f"{out[5:]}/lease/attempt-00000001.json"]
    assert json.loads(fs.cat_file(f"{out[5:]}/final/meta.json"))["fencing_token"] == 1
    record_property("robustness: concurrent writers refused", 1)


def test_stale_attempt_is_fenced_off_and_never_read(artifacts, tmp_path, record_property):
    from archipelago.experts.checkpoint import CheckpointManager, verified_or_none, verify_checkpoint
    from archipelago.lease import holder

    data = copy_tree(artifacts.data, tmp_path / "data")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(expert={"steps": 24, "log_every": 1, "checkpoint_every": 3,
                                                      "lease_ttl_s": 2})))
    out = tmp_path / "run"
    args = _args(config, str(data), str(out))
    a = _spawn(args, tmp_path / "a.log")
    b = _spawn(args, tmp_path / "b.log")
    _go(a)
    _wait_for(lambda: len(_logged_steps(out / "metrics.jsonl")) >= 4, a, what="attempt 1's first checkpoints")
    a.send_signal(signal.SIGSTOP)                    # partitioned: alive, but it cannot renew its lease
    try:
        time.sleep(3.0)                              # > lease_ttl_s: attempt 1's lease expires
        frozen_at = _logged_steps(out / "metrics.jsonl")[-1]
        _go(b)
        assert b.wait(timeout=240) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        a.send_signal(signal.SIGCONT)
    rc_a = a.wait(timeout=120)
    err_a = [ln for ln in (tmp_path / "a.log").read_text().splitlines() if ln.startswith("error: ")]
    assert rc_a == 2 and len(err_a) == 1, (tmp_path / "a.log").read_text()[-3000:]
    assert "attempt 1 lost the lease" in err_a[0] and "to attempt 2" in err_a[0], err_a

    b_log = (tmp_path / "b.log").read_text()
    assert "took over the lease" in b_log and "resuming from" in b_log, b_log[-3000:]
    rec = holder(str(out))
    assert rec.attempt == 2 and rec.released
    final = verify_checkpoint(str(out / "final"))
    assert final["fencing_token"] == 2 and final["step"] == 24
    for step_dir in (out / "checkpoints").iterdir():                 # nothing of attempt 1 after the takeover
        meta = json.loads((step_dir / "meta.json").read_text())
        assert meta["fencing_token"] == 2 or f"checkpoints/{step_dir.name}" in rec.inherited, step_dir
    assert _logged_steps(out / "metrics.jsonl") == list(range(1, 25)), frozen_at

    # ---- a stale commit that slipped through (forged): readers never pick it --------------------------------
    newest = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    stale = out / "checkpoints" / f"step-{newest + 1:08d}"
    os.system(f"cp -r {out / 'checkpoints' / f'step-{newest:08d}'} {stale}")
    meta = json.loads((stale / "meta.json").read_text())
    (stale / "meta.json").write_text(json.dumps({**meta, "fencing_token": 1, "step": newest + 1}))
    assert CheckpointManager(str(out)).latest() == str(out / "checkpoints" / f"step-{newest:08d}")
    final_meta = json.loads((out / "final" / "meta.json").read_text())
    (out / "final" / "meta.json").write_text(json.dumps({**final_meta, "fencing_token": 1}))
    assert verified_or_none(str(out / "final"), "ignored") is None
    record_property("robustness: stale attempts fenced off", 1)
