"""benchmarks/data_scale.py --quick runs end to end (tiny sizes, meaningless numbers) and writes the fields the
README quotes: prepare wall/RSS per size, island throughput per loader and store, the goal ratios."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_data_scale_quick_reports_memory_and_throughput(tmp_path):
    out = tmp_path / "ds.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_scale.py"), "--quick", "--sizes", "120",
                           "600", "--work", str(tmp_path / "w"), "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] and report["sizes"] == [120, 600]
    for n in ("120", "600"):
        run = report["runs"][n]
        prep = run["prepare"]     # the held-out split (data.holdout_fraction 0.1) is in no shard
        assert prep["num_samples"] + prep["held_out"] == int(n) and prep["held_out"] == int(n) // 10
        assert prep["latent_shape"] == [4, 8, 8]
        assert set(run["island"]) == {"memory/local", "stream/local", "memory/s3", "stream/s3"}
        assert all(v["samples_per_s"] > 0 for v in run["island"].values())
    s = report["summary"]
    assert s["prepare_rss_ratio"] > 0 and set(s["stream_vs_memory_throughput"]) == {
        "120/local", "120/s3", "600/local", "600/s3"}
    assert {"memory", "chunkstream"} <= set(report["loader"])
    assert "| size | prepare wall" in proc.stdout
