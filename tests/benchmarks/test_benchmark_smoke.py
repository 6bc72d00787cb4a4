"""The benchmark scripts whose numbers the README quotes still run end to end (their --quick mode: tiny
sizes, meaningless numbers) and write a report with the fields the README reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_ddm_vs_monolithic_quick_reports_every_arm_and_guidance(tmp_path):
    _run("ddm_vs_monolithic.py", "--quick", "--sample-cfg", "1.0", "2.0", "--work", str(tmp_path / "w"))
    report = json.loads((tmp_path / "w-quick" / "ddm_vs_monolithic-quick.json").read_text())
    rows = {(r["arm"], r["mode"], r["cfg"]) for r in report["rows"]}
    assert {("monolith", "-", 1.0), ("monolith", "-", 2.0)} <= rows
    assert {(a, m, 2.0) for a in ("ddm-k4-kmeans", "ddm-k4-random", "ddm-k8-kmeans")
            for m in ("full", "top-2", "top-1")} <= rows
    flops = {a["train_flops"] for a in report["arms"].values()}
    assert len(flops) == 1, "arms are not FLOP-matched"


@pytest.mark.timeout(300)
def test_parallel_inference_quick_writes_tables_crossover_and_trained_quality(tmp_path):
    out = tmp_path / "pi.json"
    _run("parallel_inference.py", "--quick", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["tables"]["64"]["rows"]
    names = {(r["name"], r["world_size"]) for r in rows}
    assert {("single", 1), ("sync_patch", 2), ("naive_patch", 2), ("cfg_parallel", 2)} <= names
    sync = next(r for r in rows if r["name"] == "sync_patch")
    assert sync["psnr_db"] == "inf" and sync["bytes_per_step_rank0"] > 0
    assert report["crossover"] and report["trained"]["rows"][0]["sync_patch@2"]["psnr_db"] == "inf"
