"""benchmarks/gpu_check.py cannot rot between GPU loans: its --dry-run runs every part's code path on CPU,
and a failing part or the deadline still leaves a JSON with the other parts and the error."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_dry_run_runs_every_strategy_and_sampling_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    committed = REPO / "benchmarks" / "results" / "gpu_check.json"     # the GPU's numbers: a dry run leaves them
    before = committed.read_bytes() if committed.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], check=False,
                          capture_output=True,
                          text=True, env=env, timeout=580, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and (committed.read_bytes() if committed.exists() else None) == before
    assert "single-fp32" in proc.stdout and "ensemble_top-1" in proc.stdout      # the tables are printed
    parts = report["parts"]
    assert {"setup", "env", "train", "sampling"} <= set(parts)
    assert not [p for p in parts.values() if "error" in p], parts
    runs = {r["name"]: r for r in parts["train"]["runs"]}
    assert set(runs) == {"single-fp32", "ddp-fp32", "fsdp2-fp32", "deepspeed-zero1-fp32", "deepspeed-zero2-fp32",
                         "deepspeed-zero3-fp32", "single-bf16", "deepspeed-zero2-bf16", "fsdp2-bf16"}
    for name, r in runs.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["reloaded"] and r["loss_falls"] and r["step_time_s_median"] > 0 and r["achieved_tflops"] > 0
        assert r["linear_out_dtypes"] == (["torch.bfloat16"] if name.endswith("bf16") else ["torch.float32"])
        assert r["meta_precision"] == r["precision"]
    rows = parts["sampling"]["rows"]
    assert {(r["size"], r["model"]) for r in rows} == {
        (s, m) for s in ("sample_small", "sample_large")
        for m in ("one_expert", "ensemble_full", "ensemble_top-2", "ensemble_top-1")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_a_failing_part_and_the_deadline_still_write_the_json(tmp_path, monkeypatch):
    mod = _module()

    def broken(args, deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(mod, "part_sampling", broken)
    out = tmp_path / "r.json"
    assert mod.main(["--dry-run", "--parts", "sampling", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "illegal memory access" in report["parts"]["sampling"]["error"]
    assert report["parts"]["env"]["cuda_available"] in (True, False)       # the other parts are there

    out2 = tmp_path / "late.json"
    assert mod.main(["--dry-run", "--parts", "train", "--deadline-s", "1", "--out", str(out2)]) == 0
    runs = json.loads(out2.read_text())["parts"]["train"]["runs"]
    assert runs and all(r.get("skipped") == "deadline" for r in runs)


def test_arms_rerun_only_the_named_ones_and_refuse_unknown(tmp_path):
    mod = _module()
    out = tmp_path / "late.json"
    # deadline 1 s: each selected arm is listed (as skipped) without training, so the selection shows cheaply
    assert mod.main(["--dry-run", "--parts", "train", "--arms", "ddp-fp32", "single-bf16", "--deadline-s", "1",
                     "--out", str(out)]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["parts"]["train"]["runs"]] == ["ddp-fp32", "single-bf16"]
    with pytest.raises(SystemExit, match="unknown .'nope'.*single-fp32"):
        mod.main(["--dry-run", "--parts", "train", "--arms", "nope", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()       # refused before setup: nothing ran, no report


def test_the_committed_gpu_report_prints_and_holds_every_arm(capsys):
    """The H200 report in benchmarks/results is whole: every arm trained, its loss fell and its checkpoint
    reloaded, bf16 arms really ran bf16, and each sampling row has a rate (the docs quote these numbers)."""
    path = REPO / "benchmarks" / "results" / "gpu_check.json"
    report = json.loads(path.read_text())
    assert not report["dry_run"] and report["parts"]["env"]["cuda_available"]
    runs = report["parts"]["train"]["runs"]
    assert len(runs) == 10 and all(r["loss_falls"] and r["reloaded"] for r in runs), runs
    assert all(r["linear_out_dtypes"] == [f"torch.{'bfloat16' if r['precision'] == 'bf16' else 'float32'}"]
               for r in runs)
    assert all(r["images_per_s"] > 0 for r in report["parts"]["sampling"]["rows"])
    assert _module().main(["--show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "NVIDIA H200" in shown and "fsdp2-bf16-compile" in shown and "ensemble_full" in shown
