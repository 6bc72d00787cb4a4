"""islands.flop_match: how a monolith's budget (expert.steps x expert.batch_size) is split over K islands,
checked against the definitions, recorded in checkpoints, and refused with one line when it cannot be exact."""
from __future__ import annotations

import pytest

from archipelago.config import island_expert_config, load_config
from archipelago.errors import ConfigError


def _cfg(mode: str, **expert):
    sets = [f"islands.flop_match={mode}"] + [f"expert.{k}={v}" for k, v in expert.items()]
    return load_config(None, sets)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_every_protocol_spends_the_monolith_budget(k):
    base = _cfg("batch", steps=400, batch_size=64)
    budget = base.expert.steps * base.expert.batch_size
    for mode in ("batch", "steps"):
        e = island_expert_config(_cfg(mode, steps=400, batch_size=64), k)
        assert k * e.steps * e.batch_size == budget            # K islands together: exactly the budget
    batch = island_expert_config(_cfg("batch", steps=400, batch_size=64), k)
    assert (batch.steps, batch.batch_size) == (400, 64 // k)   # the paper: same steps, batch / K
    steps = island_expert_config(_cfg("steps", steps=400, batch_size=64, ema_decay=0.99), k)
    assert (steps.steps, steps.batch_size) == (400 // k, 64)
    assert steps.ema_decay == pytest.approx(0.99 ** k, abs=1e-6)    # same EMA half-life as a run fraction
    none = island_expert_config(_cfg("none", steps=400, batch_size=64), k)
    assert (none.steps, none.batch_size) == (400, 64)


def test_default_is_the_papers_protocol():
    assert load_config(None).islands.flop_match == "batch"


def test_inexact_split_is_one_config_error():
    with pytest.raises(ConfigError, match=r"expert.batch_size.*K=3.*multiple of 3"):
        island_expert_config(_cfg("batch", batch_size=64), 3)
    with pytest.raises(ConfigError, match=r"expert.steps.*K=3"):
        island_expert_config(_cfg("steps", steps=100), 3)
    with pytest.raises(ConfigError, match="flop_match"):
        load_config(None, ["islands.flop_match=flops"])


def test_island_trains_with_its_share_and_records_it(tmp_path):
    """A real (tiny) island run: K=4 under the batch protocol trains at batch 64 / 4 = 16, and its
    checkpoint records the protocol and the effective config."""
    from archipelago.data.prepare import prepare_data
    from archipelago.experts.checkpoint import read_meta
    from archipelago.experts.train import train_expert

    cfg = load_config(None, ["expert.steps=3", "expert.batch_size=64", "expert.hidden_size=16", "expert.depth=1",
                             "expert.num_heads=2", "expert.checkpoint_every=10", "data.num_clusters=4"])
    data = str(tmp_path / "data")
    prepare_data(cfg.data, data, progress=False)
    res = train_expert(cfg, 1, data, str(tmp_path / "e1"))
    meta = read_meta(res["final_checkpoint"])
    assert meta["flop_match"] == "batch" and meta["num_clusters"] == 4
    assert meta["expert"]["batch_size"] == 16 and meta["expert"]["steps"] == 3
