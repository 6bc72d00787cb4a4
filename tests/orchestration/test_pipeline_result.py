"""What `archipelago train` / `quickstart` print at the end comes from the pipeline, not from cli.py: the failure
line naming every failed island, the done line, the map of outputs (no Ray needed)."""
from __future__ import annotations

import pytest

from archipelago.config import load_config
from archipelago.orchestration.islands import IslandResult
from archipelago.orchestration.pipeline import IslandsFailed, PipelineResult, RouterOutcome, output_map


def _result(island_status: str, router_status: str = "trained") -> PipelineResult:
    islands = [IslandResult(shard=0, name="island-0", status="trained", mode="local"),
               IslandResult(shard=1, name="island-1", status=island_status, mode="local", error="boom")]
    return PipelineResult(root="/r", islands=islands, router=RouterOutcome(status=router_status, url="/r/router"),
                          ensemble="/r/ensemble.json", grid="/r/samples/grid.png",
                          eval={"feature_distance": 1.5}, parent_run_id="abc")


def test_failure_names_every_failed_part_and_success_prints_where_things_are():
    with pytest.raises(IslandsFailed, match=r"^island-1, router failed \(see above; summary in /r/pipeline.json\)"):
        _result("failed", "failed").raise_if_failed()
    ok = _result("trained")
    ok.raise_if_failed()
    assert ok.done_line(2.0) == ("done in 2.0s: ensemble /r/ensemble.json, grid /r/samples/grid.png, "
                                 "feature distance 1.500, MLflow run abc")


def test_output_map_lists_every_stage_under_the_root():
    cfg = load_config(None, ["storage.root=/tmp/q", "tracking.enabled=false"])
    assert [name for name, _ in output_map(cfg)] == ["data shards + manifest", "expert checkpoints", "router",
                                                     "ensemble", "sample grids (PNG)", "evaluation"]
    assert dict(output_map(cfg))["ensemble"] == "/tmp/q/ensemble.json"
