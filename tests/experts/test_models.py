"""DiT / VideoDiT / EMA: shapes, adaLN-Zero init, conditioning, CFG, rebuild from metadata, block splits."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from archipelago.config import ExpertConfig
from archipelago.errors import ConfigError
from archipelago.experts import (
    DIT_SIZES,
    MODEL_CLASSES,
    DiT,
    VideoDiT,
    build_dit,
    build_video_dit,
    model_args,
)
from archipelago.experts.dit import Attention, LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed
from archipelago.experts.ema import EMA


def tiny_dit(**kw) -> DiT:
    args = {"input_size": 8, "in_channels": 1, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 4,
            "num_classes": 10}
    return DiT(**{**args, **kw})


def tiny_video(**kw) -> VideoDiT:
    args = {"input_size": 8, "in_channels": 1, "patch_size": 2, "hidden_size": 32, "depth": 4, "num_heads": 4,
            "num_classes": 10}
    return VideoDiT(**{**args, **kw})


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """adaLN-Zero makes a fresh model output 0, which would make equality tests vacuous: perturb every param."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(n: int, shape: tuple[int, ...], num_classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("input_size,in_channels,patch_size,hidden_size,depth,num_heads", [
    (16, 1, 2, 32, 2, 4),
    (8, 3, 1, 16, 1, 2),
    (16, 4, 4, 64, 3, 8),
])
def test_dit_output_shape(input_size, in_channels, patch_size, hidden_size, depth, num_heads):
    m = randomize(DiT(input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes=5))
    x, t, y = inputs(3, (in_channels, input_size, input_size), num_classes=5)
    v = m(x, t, y)
    assert v.shape == x.shape
    assert torch.isfinite(v).all() and v.abs().sum() > 0
    assert len(m.blocks) == depth and all(isinstance(b.attn, Attention) for b in m.blocks)


@pytest.mark.parametrize("size", ["DiT-T", "DiT-S"])
def test_build_dit_from_named_size(size):
    cfg = ExpertConfig(size=size, patch_size=2)
    m = build_dit(cfg, input_size=16, in_channels=1, num_classes=10)
    assert m.config_dict["hidden_size"] == DIT_SIZES[size]["hidden_size"]
    assert len(m.blocks) == DIT_SIZES[size]["depth"]
    x, t, y = inputs(2, (1, 16, 16))
    assert m(x, t, y).shape == (2, 1, 16, 16)


def test_build_dit_uses_explicit_dims_and_rejects_bad_config():
    m = build_dit(ExpertConfig(hidden_size=48, depth=3, num_heads=3, patch_size=4), 16, 2, 7)
    assert model_args(m) == {"input_size": 16, "in_channels": 2, "patch_size": 4, "hidden_size": 48, "depth": 3,
                             "num_heads": 3, "mlp_ratio": 4.0, "num_classes": 7, "class_dropout": 0.1}
    assert set(DIT_SIZES) == {"DiT-T", "DiT-S", "DiT-B"}
    with pytest.raises(ConfigError, match="DiT-XXL"):
        build_dit(ExpertConfig(size="DiT-XXL"), 16, 1, 10)
    with pytest.raises(ConfigError, match="patch_size=3 must divide input_size=16"):
        build_dit(ExpertConfig(patch_size=3), 16, 1, 10)


def test_zero_init_outputs_exactly_zero_and_pos_embed_is_sincos():
    torch.manual_seed(0)
    m = tiny_dit()
    x, t, y = inputs(4, (1, 8, 8))
    assert torch.equal(m(x, t, y), torch.zeros_like(x))
    # Every block starts as the identity (gates 0) but the embedders are not zero.
    tokens, c = m.embed(x, t, y)
    assert torch.equal(m.run_blocks(tokens, c), tokens) and c.abs().sum() > 0
    assert torch.allclose(m.pos_embed[0], get_2d_sincos_pos_embed(32, 4))
    assert m.pos_embed.abs().sum() > 0


def test_meta_device_construction_then_initialize_weights():
    """torchtitan order: build on meta, to_empty, initialize_weights -> same as a normal build."""
    with torch.device("meta"):
        m = tiny_dit()
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.initialize_weights()
    x, t, y = inputs(2, (1, 8, 8))
    assert torch.equal(m(x, t, y), torch.zeros_like(x))
    assert torch.equal(m.pos_embed, tiny_dit().pos_embed)


def test_timestep_embedder_scales_unit_interval_times_by_1000():
    torch.manual_seed(0)
    emb = TimestepEmbedder(16)
    t = torch.tensor([0.0, 0.001, 0.5, 1.0])
    expected = emb.mlp(TimestepEmbedder.timestep_embedding(t * 1000, 256))
    torch.testing.assert_close(emb(t), expected)
    # neighbouring times one DDPM index apart are clearly distinguishable
    assert (emb(t[:1]) - emb(t[1:2])).abs().max() > 1e-3


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.project_qkv(x)
    assert q.shape == (2, 2, 5, 8)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_class_dropout_replaces_labels_by_null_class_only_in_training():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    labels = torch.randint(0, 10, (256,))
    dropped = emb.token_drop(labels)
    is_null = dropped == 10
    assert 0.3 < is_null.float().mean() < 0.7
    assert torch.equal(dropped[~is_null], labels[~is_null])
    out = emb(labels, train=True)
    null_row = emb.embedding_table.weight[10]
    assert any(torch.equal(row, null_row) for row in out)
    assert torch.equal(emb(labels, train=False), emb.embedding_table(labels))
    forced = emb(labels[:3], train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced[0], null_row) and torch.equal(forced[2], null_row)
    assert torch.equal(forced[1], emb.embedding_table.weight[labels[1]])
    # dropout 0 never drops, even in training
    keep = LabelEmbedder(10, 8, 0.0)
    assert torch.equal(keep(labels, train=True), keep.embedding_table(labels))


def test_dit_training_mode_drops_labels_eval_mode_does_not():
    m = randomize(tiny_dit(class_dropout=0.5))
    x, t, y = inputs(64, (1, 8, 8))
    null_c = m.embed(x, t, torch.full_like(y, 10))[1]
    m.train()
    torch.manual_seed(3)
    c_train = m.embed(x, t, y)[1]
    n_null = sum(torch.equal(a, b) for a, b in zip(c_train, null_c))
    assert 10 < n_null < 54
    m.eval()
    c_eval = m.embed(x, t, y)[1]
    assert not any(torch.equal(a, b) for a, b in zip(c_eval, null_c))


def test_forward_with_cfg_equals_manual_combination():
    m = randomize(tiny_dit())
    x, t, y = inputs(3, (1, 8, 8))
    v_cond = m(x, t, y)
    v_uncond = m(x, t, torch.full_like(y, 10))
    expected = v_uncond + 3.0 * (v_cond - v_uncond)
    torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.forward_with_cfg(x, t, y, 1.0), v_cond, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(v_cond, v_uncond, atol=1e-3)


@pytest.mark.parametrize("cls,shape", [(DiT, (1, 8, 8)), (VideoDiT, (1, 3, 8, 8))])
def test_model_rebuilt_from_config_dict_and_state_dict_is_identical(cls, shape):
    m = randomize(tiny_dit() if cls is DiT else tiny_video())
    meta = json.loads(json.dumps({"class": type(m).__name__, "args": model_args(m)}))
    rebuilt = MODEL_CLASSES[meta["class"]](**meta["args"])
    rebuilt.load_state_dict(m.state_dict())
    rebuilt.eval()
    x, t, y = inputs(2, shape)
    assert torch.equal(rebuilt(x, t, y), m(x, t, y))
    wrapped = nn.Module()
    wrapped.module = m   # DDP-style wrapper
    assert model_args(wrapped) == model_args(m)
    with pytest.raises(TypeError, match="config_dict"):
        model_args(nn.Linear(2, 2))


def test_dit_embed_run_blocks_head_split_equals_forward():
    m = randomize(tiny_dit(depth=4))
    x, t, y = inputs(3, (1, 8, 8))
    tokens, c = m.embed(x, t, y)
    assert tokens.shape == (3, 16, 32) and c.shape == (3, 32)
    tokens = m.run_blocks(tokens, c, 0, 1)
    tokens = m.run_blocks(tokens, c, 1, 3)
    tokens = m.run_blocks(tokens, c, 3)
    torch.testing.assert_close(m.head(tokens, c), m(x, t, y), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# VideoDiT
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,input_size,in_channels,patch_size", [(1, 8, 1, 2), (4, 8, 3, 2), (3, 16, 2, 4)])
def test_video_dit_output_shape(frames, input_size, in_channels, patch_size):
    m = randomize(tiny_video(input_size=input_size, in_channels=in_channels, patch_size=patch_size))
    x, t, y = inputs(2, (in_channels, frames, input_size, input_size))
    v = m(x, t, y)
    assert v.shape == x.shape and v.abs().sum() > 0
    tokens, _ = m.embed(x, t, y)
    assert tokens.shape == (2, frames * (input_size // patch_size) ** 2, 32)


def test_video_dit_zero_init_and_builder():
    m = build_video_dit(ExpertConfig(size="DiT-T"), input_size=8, in_channels=1, num_classes=10)
    x, t, y = inputs(2, (1, 5, 8, 8))
    assert torch.equal(m(x, t, y), torch.zeros_like(x))
    assert m.config_dict["depth"] == DIT_SIZES["DiT-T"]["depth"]


def test_video_dit_block_halves_equal_full_forward():
    m = randomize(tiny_video(depth=4))
    x, t, y = inputs(2, (1, 4, 8, 8))
    tokens, c = m.embed(x, t, y, frame_offset=2)
    first = m.run_blocks(tokens, c, 0, 2)     # "rank 0"
    second = m.run_blocks(first, c, 2, 4)     # "rank 1"
    torch.testing.assert_close(m.head(second, c), m(x, t, y, frame_offset=2), atol=0, rtol=0)


def test_video_dit_frame_offset_changes_output():
    m = randomize(tiny_video())
    x, t, y = inputs(2, (1, 3, 8, 8))
    assert torch.equal(m(x, t, y, frame_offset=0), m(x, t, y))
    assert not torch.allclose(m(x, t, y, frame_offset=5), m(x, t, y), atol=1e-4)


def test_video_dit_attends_across_frames_in_frame_major_order():
    m = randomize(tiny_video())
    x, t, y = inputs(1, (1, 4, 8, 8))
    x2 = x.clone()
    x2[:, :, 0] += 1.0                         # change only frame 0
    v, v2 = m(x, t, y), m(x2, t, y)
    assert not torch.allclose(v[:, :, 3], v2[:, :, 3], atol=1e-5)   # frame 3 sees frame 0
    # Token block f*T:(f+1)*T belongs to frame f: a zero-layer model maps frame 0 tokens to frame 0 only.
    shallow = randomize(tiny_video(depth=1))
    shallow.blocks = nn.ModuleList()
    a, b = shallow(x, t, y), shallow(x2, t, y)
    assert torch.equal(a[:, :, 1:], b[:, :, 1:]) and not torch.equal(a[:, :, 0], b[:, :, 0])


def test_video_dit_shares_dit_block_classes():
    from archipelago.experts.dit import DiTBlock
    m = tiny_video()
    assert all(type(b) is DiTBlock and type(b.attn) is Attention for b in m.blocks)


# ----------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------

def test_ema_warmup_ramps_decay_and_counts_updates():
    model = randomize(tiny_dit(), seed=0)
    ema = EMA(model, decay=0.999)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    randomize(model, seed=1)
    assert ema.current_decay() == pytest.approx(0.1)        # (1 + 0) / (10 + 0)
    ema.update(model)
    name = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(ema.state_dict()[name], 0.1 * old[name] + 0.9 * dict(model.named_parameters())[name])
    assert ema.num_updates == 1
    ema.num_updates = 100_000
    assert ema.current_decay() == pytest.approx(0.999)      # the ramp ends at the configured decay


def test_ema_update_copy_to_and_wrapped_names():
    model = randomize(tiny_dit(), seed=0)
    ema = EMA(model, decay=0.9, warmup=False)
    assert all(not p.requires_grad for p in ema.shadow.parameters())
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    randomize(model, seed=1)
    ema.update(model)
    name = "blocks.0.attn.qkv.weight"
    new_param = dict(model.named_parameters())[name]
    torch.testing.assert_close(ema.state_dict()[name], 0.9 * old[name] + 0.1 * new_param)
    assert not torch.equal(ema.state_dict()[name], new_param)

    # A DDP-like wrapper (names prefixed "module.") and a mapping of full tensors both work.
    wrapper = nn.Module()
    wrapper.module = model
    ema.update(wrapper)
    ema.update({f"module.{k}": v for k, v in model.state_dict().items()})
    with pytest.raises(KeyError, match="missing"):
        ema.update({"pos_embed": model.pos_embed})

    target = tiny_dit()
    ema.copy_to(target)
    x, t, y = inputs(2, (1, 8, 8))
    assert torch.equal(target.eval()(x, t, y), ema.shadow(x, t, y))
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)
