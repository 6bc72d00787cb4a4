"""A local Ray head killed without `ray stop` leaves Ray's bootstrap file (ray_current_cluster) behind; with no
address given, `connect_ray` (the pipeline's and the launchers' way in) must notice that nothing answers
there and start a fresh local instance with a one-line note, instead of retrying the dead GCS for minutes.

Isolated from every other Ray on the machine: the head and the client run with RAY_TMPDIR set to a private
temporary directory, and only the processes this test started are killed (by process group, then by pid).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONNECT = ("import ray; from archipelago.cluster.local import connect_ray; connect_ray(num_cpus=1, "
           "include_dashboard=False, logging_level='ERROR'); print('answer', ray.get(ray.remote(lambda: 41 + 1)"
           ".remote())); ray.shutdown()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ours(marker: str) -> list[int]:
    """pids of live processes whose command line mentions `marker` (our private temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_dead_recorded_head_gives_a_note_and_a_fresh_instance(record_property):
    tmp = tempfile.mkdtemp(prefix="arh", dir="/tmp")    # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TMPDIR")}
    env.update({"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"})
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent))
    port = _free_port()
    head = subprocess.Popen([ray_exe, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats", "--block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    bootstrap = Path(tmp) / "ray" / "ray_current_cluster"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (bootstrap.exists() and _answers(port)):
            assert head.poll() is None, "ray start --head exited early"
            time.sleep(0.5)
        assert bootstrap.exists() and _answers(port), "the head never came up"
        assert bootstrap.read_text().strip().endswith(f":{port}")

        # ---- the head dies hard: every process of its group, then stragglers of ours, by pid ------------
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        for pid in _ours(tmp):
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and _answers(port):
            time.sleep(0.2)
        assert not _answers(port) and bootstrap.exists()          # the stale file is left behind

        # ---- connect with no address: a note naming the file, then a working fresh instance ------------
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CONNECT], env=env, capture_output=True, text=True,
                             timeout=150, cwd=REPO)
        wall = time.perf_counter() - t0
        report = f"rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert res.returncode == 0 and "answer 42" in res.stdout, report
        notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")]
        assert len(notes) == 1 and str(bootstrap) in notes[0] and "no longer answers" in notes[0], report
        assert f":{port}" in notes[0], report
        record_property("robustness: dead recorded Ray heads survived", 1)
        print(f"connect with a dead recorded head: {wall:.1f}s")
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
        for pid in _ours(tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
