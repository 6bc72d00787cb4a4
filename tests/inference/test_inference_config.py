"""ParallelConfig validation and layout, and the single-process pieces (no process group needed)."""
from __future__ import annotations

import pytest
import torch

from archipelago.errors import ConfigError
from archipelago.eval.fidelity import psnr
from archipelago.experts.sampling import sample
from archipelago.inference.comm import Comm, Group
from archipelago.inference.config import Mode, ParallelConfig, experts_for_rank
from archipelago.inference.parallelize import parallelize_for_inference, topk_weights
from archipelago.inference.patch import PatchContext, PatchParallelDiT
from archipelago.inference.runner import parallel_sample

from .conftest import tiny_dit


def test_degrees_are_inferred_from_mode_and_world_size():
    assert ParallelConfig().describe().startswith("single world=1")
    c = ParallelConfig(mode="sync_patch", world_size=4)
    assert (c.patch_degree, c.cfg_degree, c.expert_degree, c.patch_scheme) == (4, 1, 1, Mode.sync_patch)
    c = ParallelConfig(mode="cfg_parallel", world_size=4, patch_mode="distrifusion")
    assert (c.patch_degree, c.cfg_degree, c.patch_scheme) == (2, 2, Mode.distrifusion)
    assert ParallelConfig(mode="cfg_parallel", world_size=2).patch_scheme is None
    assert ParallelConfig(mode="expert_parallel", world_size=3).expert_degree == 3


def test_degree_product_mismatch_lists_every_degree():
    with pytest.raises(ValueError) as err:
        ParallelConfig(mode="cfg_parallel", world_size=8, patch_degree=2)
    msg = str(err.value)
    for part in ("patch_degree=2", "cfg_degree=2", "expert_degree=1", "= 4", "world_size=8"):
        assert part in msg
    want = r"patch_degree=3 x cfg_degree=1 x expert_degree=1 = 3 != world_size=2"
    with pytest.raises(ConfigError, match=want):
        ParallelConfig.create(mode="sync_patch", world_size=2, patch_degree=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "tensor_parallel"}, "mode"),                              # unknown mode
    ({"mode": "sync_patch", "world_size": 2, "split": "columns"}, "split"),
    ({"mode": "sync_patch", "world_size": 2, "bogus": 1}, "bogus"),     # unknown field
    ({"mode": "single", "world_size": 2}, "single"),
    ({"mode": "sync_patch", "world_size": 4, "patch_degree": 2, "cfg_degree": 2}, "cfg_parallel"),
    ({"mode": "expert_parallel", "world_size": 2, "patch_degree": 2, "expert_degree": 1},
     "expert_degree only"),
    ({"mode": "distrifusion", "world_size": 2, "warmup_steps": -1}, "warmup_steps"),
    ({"mode": "distrifusion", "world_size": 2, "comm_group_layers": 0}, "comm_group_layers"),
])
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)


def test_from_the_yaml_inference_section():
    from archipelago.config import InferenceConfig

    c = ParallelConfig.from_inference(InferenceConfig(mode="distrifusion", world_size=4, warmup_steps=3,
                                                      comm_group_layers=2))
    assert (c.mode, c.patch_degree, c.warmup_steps, c.comm_group_layers) == (Mode.distrifusion, 4, 3, 2)
    single = ParallelConfig.from_inference(InferenceConfig(world_size=4))      # single ignores world_size
    assert (single.mode, single.world_size) == (Mode.single, 1)
    # one enum: the YAML section and the layout object share it
    assert InferenceConfig.model_fields["mode"].annotation is Mode


def test_rank_layout_matches_the_docstring_example():
    c = ParallelConfig(mode="cfg_parallel", world_size=8, patch_degree=4, patch_mode="distrifusion")
    assert c.inner_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert c.cfg_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert c.coords(5) == (1, 1)
    assert experts_for_rank(4, 2, 0) == [0, 2] and experts_for_rank(4, 2, 1) == [1, 3]
    with pytest.raises(ConfigError, match="every rank needs"):
        experts_for_rank(1, 2, 0)


def test_world_size_one_is_a_no_op_and_parallel_sample_equals_sample():
    model = tiny_dit()
    assert parallelize_for_inference(model, ParallelConfig(), Comm()) is model
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2])
    for sampler, cfg in (("euler", 1.0), ("heun", 2.0)):
        want = sample(model, noise, y, steps=3, sampler=sampler, cfg_scale=cfg)
        got = parallel_sample(model, noise, y, steps=3, sampler=sampler, cfg_scale=cfg)
        assert torch.equal(want, got)


def test_band_embedding_uses_the_absolute_rows_of_the_positional_table():
    model = tiny_dit()
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 3])
    full_tokens, full_c = model.embed(x, t, y)                                # [2, 64, D]
    for index in range(2):
        ctx = PatchContext(comm=Comm(), group=Group([0, 1], index), scheme=Mode.naive_patch)
        tokens, c = PatchParallelDiT(model, ctx).embed_rows(x, t, y)
        assert torch.allclose(tokens, full_tokens[:, index * 32:(index + 1) * 32], atol=1e-6)
        assert torch.equal(c, full_c)
    ctx = PatchContext(comm=Comm(), group=Group([0, 1, 2], 0), scheme=Mode.naive_patch)
    with pytest.raises(ConfigError, match="must divide the 8 token rows"):
        PatchParallelDiT(model, ctx).rows(8)


def test_topk_weights_and_psnr():
    w = topk_weights(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]), 1)
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(topk_weights(torch.zeros(1, 4), None), torch.full((1, 4), 0.25))
    ref = torch.linspace(-1, 1, 100)
    assert psnr(ref, ref) == float("inf")
    assert psnr(ref + 0.02, ref) == pytest.approx(20 * torch.log10(torch.tensor(2 / 0.02)).item(), rel=1e-6)


def test_sequence_and_pipeline_degrees_multiply_with_cfg():
    c = ParallelConfig(mode="usp", world_size=8, cfg_degree=2)
    assert (c.ulysses_degree, c.ring_degree, c.cfg_degree, c.inner_degree) == (2, 2, 2, 4)
    assert c.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert c.ring_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert c.cfg_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ParallelConfig(mode="usp", world_size=8, ring_degree=4).ulysses_degree == 2
    assert ParallelConfig(mode="ring", world_size=4, cfg_degree=2).ring_degree == 2
    c = ParallelConfig(mode="pipefusion", world_size=4)
    assert (c.pipe_degree, c.num_pipe_patches) == (4, 4)
    assert ParallelConfig(mode="pipefusion", world_size=2, pipe_patches=8).describe() == \
        "pipefusion world=2 stages=2 patches=8 cfg=1 warmup=1"


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "ulysses", "world_size": 4, "ulysses_degree": 3},
     ("ulysses_degree=3 x ring_degree=1 x pipe_degree=1 x patch_degree=1 x cfg_degree=1 x expert_degree=1 = 3 "
      "!= world_size=4")),
    ({"mode": "ulysses", "world_size": 4, "ring_degree": 2, "ulysses_degree": 2}, "does not use ring_degree"),
    ({"mode": "pipefusion", "world_size": 2, "warmup_steps": 0}, "warmup_steps >= 1"),
    ({"mode": "sync_patch", "world_size": 4, "ulysses_degree": 2, "patch_degree": 2}, "does not use ulysses"),
])
def test_hybrid_layouts_that_do_not_fit_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        ParallelConfig.create(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,cls,args,shape,match", [
    ({"mode": "ulysses", "world_size": 4}, "DiT", {"num_heads": 2}, None, "must divide the 2 attention heads"),
    ({"mode": "usp", "world_size": 4, "ulysses_degree": 1, "ring_degree": 4}, "DiT", {"input_size": 6},
     None, "must divide the 9 tokens"),
    ({"mode": "pipefusion", "world_size": 4}, "DiT", {"depth": 2}, None, "cannot share depth=2"),
    ({"mode": "pipefusion", "world_size": 2, "pipe_patches": 3}, "DiT", {}, None, "must divide the 8 token rows"),
    ({"mode": "sync_patch", "world_size": 2}, "VideoDiT", {}, [1, 4, 16, 16], "ulysses | ring | usp"),
    ({"mode": "ring", "world_size": 3}, "VideoDiT", {}, [1, 3, 16, 16], None),   # 3 frames x 64 tokens fit
])
def test_layout_is_checked_against_the_model_before_any_rank_starts(kwargs, cls, args, shape, match):
    from archipelago.inference.config import check_layout_fits

    model = {"input_size": 16, "patch_size": 2, "num_heads": 4, "depth": 4, **args}
    pcfg = ParallelConfig(**kwargs)
    if match is None:
        check_layout_fits(pcfg, cls, model, shape)
        return
    with pytest.raises(ConfigError, match=match):
        check_layout_fits(pcfg, cls, model, shape)
