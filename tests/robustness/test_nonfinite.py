"""The non-finite guard beyond the CLI cases of test_bad_inputs.py: `on_nonfinite: skip` rides out a transient
nan (a real training run whose loss is made nan at chosen steps) and stops with one line once more steps
than `max_nonfinite_skips` went bad; the skipped steps are counted in metrics.jsonl and the weights stay
finite."""
from __future__ import annotations

import json

import pytest
import torch
from robustness_support import copy_tree, tiny_config


def _nan_at(monkeypatch, bad_calls: set[int]) -> None:
    """Make flow_matching_loss return nan on the given (0-based) calls: one call per step here."""
    from archipelago.experts import flow

    real = flow.flow_matching_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        loss = real(*args, **kwargs)
        n, calls["n"] = calls["n"], calls["n"] + 1
        return loss * float("nan") if n in bad_calls else loss
    monkeypatch.setattr(flow, "flow_matching_loss", patched)


def test_skip_mode_rides_out_transient_nan_and_counts_it(artifacts, tmp_path, monkeypatch, record_property):
    from archipelago.experts.checkpoint import load_expert
    from archipelago.experts.train import train_expert

    data = copy_tree(artifacts.data, tmp_path / "data")
    cfg = tiny_config(expert={"on_nonfinite": "skip", "max_nonfinite_skips": 2, "log_every": 1})
    _nan_at(monkeypatch, {2, 4})                     # steps 3 and 5
    res = train_expert(cfg, 0, str(data), str(tmp_path / "run"))
    assert res["final_checkpoint"] and res["steps"] == cfg.expert.steps
    model, meta = load_expert(res["final_checkpoint"])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.expert.steps + 1))
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 2, 2]
    record_property("robustness: non-finite steps handled", 2)


def test_skip_mode_stops_after_the_bound(artifacts, tmp_path, monkeypatch, record_property):
    from archipelago.errors import DivergenceError
    from archipelago.experts.train import train_expert

    data = copy_tree(artifacts.data, tmp_path / "data")
    cfg = tiny_config(expert={"on_nonfinite": "skip", "max_nonfinite_skips": 1})
    _nan_at(monkeypatch, {1, 3})                     # steps 2 and 4: the second one is one too many
    with pytest.raises(DivergenceError) as err:
        train_expert(cfg, 0, str(data), str(tmp_path / "run"))
    line = str(err.value)
    assert "non-finite loss nan at step 4" in line and "after 1 skipped step(s)" in line, line
    assert "last good checkpoint:" in line and "step-00000003" in line, line
    assert not (tmp_path / "run" / "final").exists()
    record_property("robustness: non-finite steps handled", 2)
