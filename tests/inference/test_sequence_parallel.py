"""Ulysses, ring attention, USP (and their CFG hybrids) and PipeFusion across real gloo processes, for the
image DiT and the video DiT, against the single-device output.

One spawn per world size runs every layout in the same process group (each case parallelizes a fresh copy
of the same seeded model), so the file pays process start-up twice, not once per case.
"""
from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch

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


def _worker(rank: int, init_method: str, world: int, out: Any) -> None:
    set_threads(1)
    try:
        results = {}
        with process_group(world, rank, init_method, torch.device("cpu")):
            for name, (kind, kwargs, cfg) in CASES[world].items():
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


@pytest.mark.timeout(180)
def test_sequence_modes_and_pipeline_equal_single_device(runs):
    world, ranks = runs
    for name, (kind, kwargs, cfg) in CASES[world].items():
        model, noise, y = case_inputs(kind)
        with torch.no_grad():
            ref = parallel_sample(model, noise, y, STEPS, cfg_scale=cfg)
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
