"""Ulysses, ring attention, USP (and their CFG hybrids) and PipeFusion across real gloo processes, for the
image DiT and the video DiT, against the single-device output.

One spawn per world size runs every layout in the same process group (each case parallelizes a fresh copy
of the same seeded model), so the file pays process start-up twice, not once per case.
"""
from __future__ import annotations

import itertools
import traceback
from typing import Any

import pytest
import torch
from torch import nn

from archipelago.experts.sampling import euler_step, timesteps
from archipelago.experts.video_dit import VideoDiT
from archipelago.inference.comm import Comm
from archipelago.inference.config import ParallelConfig
from archipelago.inference.local import set_threads, spawn_ranks
from archipelago.inference.parallelize import parallelize_for_inference
from archipelago.inference.rank import process_group
from archipelago.inference.runner import parallel_sample

from .conftest import randomize, tiny_dit

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STEPS = 3


def tiny_video_dit(seed: int = 0) -> VideoDiT:
    """4 frames x 4x4 tokens (64 tokens), 4 heads."""
    return randomize(VideoDiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                              num_classes=10), seed)


def case_inputs(kind: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, noise, labels) of a case, identical in every process (the constructor's init draws from the
    global generator, so it is seeded too)."""
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(11)
    if kind == "video":
        return tiny_video_dit(seed=3), torch.randn(2, 1, 4, 8, 8, generator=gen), torch.tensor([1, 5])
    return tiny_dit(seed=3), torch.randn(2, 1, 16, 16, generator=gen), torch.tensor([2, 7])


# name -> (model kind, ParallelConfig kwargs without world_size, cfg scale)
CASES: dict[int, dict[str, tuple[str, dict[str, Any], float]]] = {
    2: {
        "ulysses": ("image", {"mode": "ulysses"}, 1.0),
        "ring": ("image", {"mode": "ring"}, 1.0),
        "ring-video": ("video", {"mode": "ring"}, 1.0),
        "pipefusion-warm": ("image", {"mode": "pipefusion", "warmup_steps": STEPS}, 1.0),
    },
    4: {
        "usp": ("image", {"mode": "usp", "ulysses_degree": 2, "ring_degree": 2}, 1.0),
        "usp-video": ("video", {"mode": "usp", "ulysses_degree": 2, "ring_degree": 2}, 1.0),
        "ulysses-4": ("image", {"mode": "ulysses"}, 1.0),
        "cfg2-ulysses2": ("image", {"mode": "ulysses", "cfg_degree": 2}, 2.0),
        "cfg2-pipefusion2": ("image", {"mode": "pipefusion", "cfg_degree": 2, "warmup_steps": STEPS}, 2.0),
    },
}
# PipeFusion past its warm-up: compared with `pipefusion_reference`, not with one device
STALE: dict[int, dict[str, tuple[str, dict[str, Any], float]]] = {
    2: {"pipefusion": ("image", {"mode": "pipefusion", "warmup_steps": 1, "pipe_patches": 4}, 1.0)},
    4: {},
}


def _worker(rank: int, init_method: str, world: int, out: Any) -> None:
    set_threads(1)
    try:
        results = {}
        with process_group(world, rank, init_method, torch.device("cpu")):
            for name, (kind, kwargs, cfg) in {**CASES[world], **STALE[world]}.items():
                model, noise, y = case_inputs(kind)
                comm = Comm()
                fn = parallelize_for_inference(model, ParallelConfig(world_size=world, **kwargs), comm)
                x = parallel_sample(fn, noise, y, STEPS, cfg_scale=cfg)
                fn.finish()
                results[name] = (x.numpy(), comm.stats.as_dict())
        out.put((rank, results, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        out.put((rank, None, traceback.format_exc()))


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def runs(request) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, spawn_ranks(_worker, world, (world,), timeout_s=150)


def single_device(kind: str, cfg: float) -> tuple[torch.Tensor, tuple]:
    """(the one-device samples of a case, its (model, noise, labels))."""
    inputs = case_inputs(kind)
    with torch.no_grad():
        return parallel_sample(*inputs, STEPS, cfg_scale=cfg), inputs


@pytest.mark.timeout(180)
def test_sequence_modes_and_pipeline_equal_single_device(runs):
    world, ranks = runs
    for name, (kind, _, cfg) in CASES[world].items():
        ref, _ = single_device(kind, cfg)
        assert ref.abs().mean() > 0.1, name
        for r, by_case in enumerate(ranks):
            got = torch.from_numpy(by_case[name][0])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{name} rank {r}")


def test_bytes_per_step_are_counted_by_comm(runs):
    world, ranks = runs
    n, heads, dh, depth = 2, 4, 8, 2
    fp32 = 4
    if world == 2:
        # Ulysses: per layer two all-to-alls, q/k/v out ([3, N, H, 32, Dh]) and o back ([N, H, 32, Dh]),
        # each sending half to the other rank; ring: one hop of this rank's K/V [2, N, H, 32, Dh] per layer.
        local = n * heads * 32 * dh * fp32
        a2a = ranks[0]["ulysses"][1]["by_type"]["attn_a2a"]
        assert a2a["bytes"] == STEPS * depth * (3 * local + local) // 2
        ring = ranks[0]["ring"][1]["by_type"]["attn_ring"]
        assert (ring["bytes"], ring["async_calls"]) == (STEPS * depth * 2 * local, STEPS * depth)
        # PipeFusion moves hidden states ([N, 64, D=32] per evaluation, stage 0 -> 1), never K/V
        pipe = ranks[0]["pipefusion-warm"][1]["by_type"]
        assert pipe["pipe_hidden"]["bytes"] == STEPS * n * 64 * 32 * fp32 and "attn_kv" not in pipe
        assert ranks[1]["pipefusion-warm"][1]["by_type"]["output"]["bytes"] == 0    # the last stage sends
    else:
        usp = ranks[0]["usp"][1]
        assert set(usp["by_type"]) == {"attn_a2a", "attn_ring", "output"}
        assert usp["by_step"] == {k: usp["total_bytes"] // STEPS for k in range(STEPS)}
        assert ranks[0]["cfg2-ulysses2"][1]["by_type"]["cfg"]["bytes"] > 0


class _BufferedAttention(nn.Module):
    """Reference attention of PipeFusion: a whole-image K/V buffer whose slice `band` is refreshed."""

    band = slice(None)

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn, self.kv = attn, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.project_qkv(x)
        fresh = torch.stack([k, v])
        if self.kv is None or fresh.shape[3] == self.kv.shape[3]:
            self.kv = fresh
        else:
            self.kv[:, :, :, self.band] = fresh
        return self.attn.project_out(self.attn.attend(q, self.kv[0], self.kv[1]))


@torch.no_grad()
def pipefusion_reference(model: nn.Module, noise: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                         patches: int) -> torch.Tensor:
    """PipeFusion on one process, spelled out: after the warm-up, the bands go through all blocks one after
    the other; a band attends to the K/V buffer in which it (and the bands before it, this evaluation) are
    fresh and the later bands are from the previous evaluation. Stages only decide where blocks run."""
    for blk in model.blocks:
        blk.attn = _BufferedAttention(blk.attn)
    x = noise.float()
    for k, (t, t_next) in enumerate(itertools.pairwise(timesteps(steps).tolist())):
        tokens, c = model.embed(x, torch.full((x.shape[0],), t), y)
        m = 1 if k < warmup else patches
        per = tokens.shape[1] // m
        outs = []
        for i in range(m):
            _BufferedAttention.band = slice(i * per, (i + 1) * per)
            outs.append(model.run_blocks(tokens[:, i * per:(i + 1) * per], c))
        x = euler_step(x, model.head(torch.cat(outs, dim=1), c), t, t_next)
    return x


def test_pipefusion_uses_stale_kv_of_the_later_patches(runs):
    world, ranks = runs
    for name, (kind, kwargs, cfg) in STALE[world].items():
        exact, inputs = single_device(kind, cfg)
        want = pipefusion_reference(*inputs, STEPS, kwargs["warmup_steps"], kwargs["pipe_patches"])
        got = torch.from_numpy(ranks[0][name][0])
        assert not torch.allclose(got, exact, atol=1e-4), name          # stale K/V changes the result ...
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)      # ... in exactly PipeFusion's way
        assert torch.equal(got, torch.from_numpy(ranks[1][name][0]))
        hidden = ranks[0][name][1]["by_type"]["pipe_hidden"]
        assert hidden["calls"] == 1 + (STEPS - 1) * kwargs["pipe_patches"]   # warm-up: one whole-image patch
