"""Ensemble: routing modes against their definitions (in-memory experts with non-trivial weights and stub
routers), CFG routing, forward-call accounting, and ensemble.json checks on real trained checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from archipelago import storage
from archipelago.config import ArchipelagoConfig
from archipelago.ensemble import Ensemble, from_models, load_ensemble, read_spec, write_ensemble
from archipelago.errors import EnsembleError
from archipelago.experts.dit import DiT
from archipelago.experts.sampling import sample

K = 3


def _random_dit(seed: int, **kw) -> DiT:
    """A tiny DiT whose zero-initialised parts (adaLN, final layer) are randomised, so v != 0."""
    torch.manual_seed(seed)
    args = {"input_size": 8, "in_channels": 1, "patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2,
            "num_classes": 10, **kw}
    m = DiT(**args)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


class FixedRouter(nn.Module):
    """Stub router: the same logits for every sample."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))
        self.num_experts = len(logits)

    def forward(self, x, t, y=None):
        return self.logits.expand(x.shape[0], -1)


class LinearRouter(nn.Module):
    """Stub router whose logits depend on the sample and the class (so routing varies across a batch)."""

    def __init__(self, seed: int, k: int = K):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(64, k, generator=g))
        self.register_buffer("wy", torch.randn(11, k, generator=g))
        self.num_experts = k

    def forward(self, x, t, y=None):
        return x.flatten(1) @ self.w + self.wy[y]


class CountingExpert(nn.Module):
    """Wraps an expert and records every batch it evaluates."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes
        self.in_channels, self.input_size = inner.in_channels, inner.input_size
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.batches.append((x.clone(), y.clone()))
        return self.inner(x, t, y)


@pytest.fixture(scope="module")
def experts() -> list[DiT]:
    return [_random_dit(s) for s in range(K)]


def _batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g),
            torch.randint(0, 10, (n,), generator=g))


# ----------------------------------------------------------------------------------------------------
# Routing modes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("j", [0, 2])
def test_top1_with_one_hot_router_reproduces_that_expert_exactly(experts, j):
    logits = [0.0] * K
    logits[j] = 1e4
    ens = from_models(experts, FixedRouter(logits), "top-1")
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    for cfg_scale in (1.0, 2.0):
        a = sample(ens, noise, y, steps=4, cfg_scale=cfg_scale)
        b = sample(experts[j], noise, y, steps=4, cfg_scale=cfg_scale)
        assert torch.equal(a, b)
    others = [i for i in range(K) if i != j]
    assert all(ens.expert_samples[i] == 0 for i in others)
    assert ens.expert_calls == 4 + 4    # one call per step, both guidance branches in one batch


def test_full_with_uniform_router_is_the_mean_velocity(experts):
    ens = from_models(experts, FixedRouter([0.0] * K), "full")
    x, t, y = _batch()
    with torch.no_grad():
        v = ens(x, t, y)
        mean = torch.stack([e(x, t, y) for e in experts]).mean(0)
    assert torch.allclose(v, mean, atol=1e-6), (v - mean).abs().max()
    assert not torch.allclose(experts[0](x, t, y), experts[1](x, t, y))   # the test is not vacuous
    assert ens.expert_calls == K and ens.expert_samples == [x.shape[0]] * K


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_runs_only_k_experts_per_sample_and_matches_its_definition(experts, k):
    router = LinearRouter(5)
    wrapped = [CountingExpert(e) for e in experts]
    ens = from_models(wrapped, router, f"top-{k}")
    x, t, y = _batch(n=32)
    with torch.no_grad():
        v = ens(x, t, y)
        probs = router(x, t, y).softmax(-1)
        top_p, top_i = probs.topk(k, -1)
        dense = torch.stack([e(x, t, y) for e in experts], 1)                # [N, K, C, H, W]
        want = (dense.gather(1, top_i[:, :, None, None, None].expand(-1, -1, 1, 8, 8))
                * (top_p / top_p.sum(-1, keepdim=True))[:, :, None, None, None]).sum(1)
    assert torch.allclose(v, want, atol=1e-5)
    # Accounting: each sample seen by exactly k experts, one batched call per selected expert.
    assert sum(ens.expert_samples) == k * x.shape[0]
    assert ens.expert_calls == sum(1 for w in wrapped if w.batches) <= K
    seen = torch.zeros(x.shape[0], dtype=torch.long)
    for w in wrapped:
        assert len(w.batches) <= 1
        for bx, _ in w.batches:
            hit = (bx[:, None] == x[None]).flatten(2).all(-1).nonzero()[:, 1]
            seen[hit] += 1
    assert torch.equal(seen, torch.full_like(seen, k))
    assert len({tuple(r) for r in top_i.sort(-1).values.tolist()}) > 1      # routing really varies


def test_cfg_routes_on_the_conditional_half_and_reuses_it(experts):
    router = LinearRouter(3)
    wrapped = [CountingExpert(e) for e in experts]
    ens = from_models(wrapped, router, "top-1")
    x, t, y = _batch(n=16)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        ens(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        chosen = router(x, t, y).argmax(-1)          # routing of the conditional samples
    assert ens.router_samples == 16                   # the router ran on the conditional half only
    for k, w in enumerate(wrapped):
        want = int((chosen == k).sum())
        got_cond = sum(int((by != 10).sum()) for _, by in w.batches)
        got_uncond = sum(int((by == 10).sum()) for _, by in w.batches)
        assert got_cond == got_uncond == want        # both branches of a sample go to the same expert
    assert sum(1 for w in wrapped if w.batches) > 1   # routing really varies
    # forward_with_cfg is the same computation as the sampler's guidance.
    with torch.no_grad():
        a = ens.forward_with_cfg(x, t, y, 3.0)
        v = ens(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    assert torch.allclose(a, v[16:] + 3.0 * (v[:16] - v[16:]))


def test_unknown_mode_and_k_too_large_are_one_line(experts):
    for mode in ("top-0", "best", f"top-{K + 1}"):
        with pytest.raises(EnsembleError) as ei:
            Ensemble(experts, FixedRouter([0.0] * K), mode)
        assert "\n" not in str(ei.value)
    with pytest.raises(EnsembleError, match="router predicts 2"):
        Ensemble(experts, FixedRouter([0.0, 0.0]), "full")


# ----------------------------------------------------------------------------------------------------
# ensemble.json on real checkpoints
# ----------------------------------------------------------------------------------------------------

def _cfg(**expert) -> ArchipelagoConfig:
    cfg = ArchipelagoConfig()
    cfg.data.num_clusters = 2
    e = {"hidden_size": 32, "depth": 1, "num_heads": 2, "steps": 3, "batch_size": 16, "warmup_steps": 1,
         "checkpoint_every": 100, "log_every": 1, **expert}
    for key, val in e.items():
        setattr(cfg.expert, key, val)
    cfg.router.steps, cfg.router.batch_size, cfg.router.hidden_size, cfg.router.depth = 5, 32, 16, 1
    cfg.expert.sample_steps = 4
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """K=2 digits data, two tiny experts, a tiny router (trained for a few steps: only shapes matter here)."""
    from archipelago.data.prepare import prepare_data
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    root = tmp_path_factory.mktemp("ens")
    cfg = _cfg()
    data = str(root / "data")
    prepare_data(cfg.data, data, progress=False)
    experts = {k: train_expert(cfg, k, data, str(root / f"expert-{k}"))["final_checkpoint"] for k in range(2)}
    odd = train_expert(_cfg(hidden_size=16), 1, data, str(root / "expert-1-h16"))["final_checkpoint"]
    router = train_router(cfg, data, str(root / "router"))["router"]
    return {"root": root, "cfg": cfg, "data": data, "experts": experts, "router": router, "odd": odd}


def _copy_with_meta(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    edit(meta)
    (dst / "meta.json").write_text(json.dumps(meta))
    return str(dst)


def test_write_and_load_roundtrip(trained, tmp_path):
    url = str(tmp_path / "ensemble.json")
    spec = write_ensemble(url, trained["experts"], trained["router"], trained["data"],
                          trained["cfg"].config_hash(), name="t")
    assert read_spec(url) == spec and sorted(spec.experts) == [0, 1] and len(spec.shard_sha256) == 2
    ens = load_ensemble(url, mode="top-2")
    assert ens.num_classes == 10 and len(ens.experts) == 2 and not ens.training
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.arange(4)
    with torch.no_grad():
        assert ens(x, t, y).shape == x.shape
    assert load_ensemble(str(tmp_path), mode="full").mode == "full"      # the directory works too


@pytest.mark.parametrize("case", ["hidden_size", "num_classes", "shard_sha", "swapped", "router_k",
                                  "router_data"])
def test_mismatched_parts_are_rejected_with_one_line(trained, tmp_path, case):
    experts, router = dict(trained["experts"]), trained["router"]
    if case == "hidden_size":
        experts[1], expect = trained["odd"], "expert 1 .*hidden_size=16 differs from expert 0's 32"
    elif case == "num_classes":
        def edit(m):
            m["model"]["args"]["num_classes"] = 7
            m["num_classes"] = 7
        experts[1], expect = _copy_with_meta(experts[1], tmp_path / "e1", edit), "expert 1 .*num_classes=7"
    elif case == "shard_sha":
        experts[1] = _copy_with_meta(experts[1], tmp_path / "e1", lambda m: m.update(shard_sha256="0" * 64))
        expect = "expert 1 .*shard sha256 000000000000… does not match the manifest's shard 1"
    elif case == "swapped":
        experts[1], expect = experts[0], "expert 1 .*trained on shard 0, not shard 1"
    elif case == "router_k":
        router, expect = _copy_with_meta(router, tmp_path / "r", lambda m: m.update(num_experts=3)), \
            "router .*predicts K=3 clusters but the ensemble has 2 experts"
    else:
        router = _copy_with_meta(router, tmp_path / "r", lambda m: m.update(data_manifest_sha256="f" * 64))
        expect = "router .*trained on data manifest ffffffffffff…"
    url = str(tmp_path / "ensemble.json")
    with pytest.raises(EnsembleError, match=expect) as ei:
        write_ensemble(url, experts, router, trained["data"], "h")
    assert "\n" not in str(ei.value)
    assert not storage.exists(url)
    # load_ensemble checks the same things on a hand-written ensemble.json.
    good = write_ensemble(str(tmp_path / "good.json"), trained["experts"], trained["router"], trained["data"], "h")
    raw = good.model_dump(mode="json")
    raw["experts"] = {str(k): v for k, v in experts.items()}
    raw["router"] = router
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(EnsembleError, match=expect):
        load_ensemble(str(tmp_path / "bad.json"))


def test_changed_data_after_writing_is_detected(trained, tmp_path):
    url = str(tmp_path / "ensemble.json")
    write_ensemble(url, trained["experts"], trained["router"], trained["data"], "h")
    raw = json.loads((tmp_path / "ensemble.json").read_text())
    data_copy = tmp_path / "data"
    shutil.copytree(trained["data"], data_copy)
    manifest = json.loads((data_copy / "manifest.json").read_text())
    manifest["seed"] = 99
    (data_copy / "manifest.json").write_text(json.dumps(manifest))
    raw["data_url"] = str(data_copy)
    (tmp_path / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(EnsembleError, match="changed since the ensemble was written"):
        load_ensemble(url)
