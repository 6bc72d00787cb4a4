"""Router: it learns the clusters of noised digits (accuracy well above chance at low t), its metrics
(per-t accuracy, ECE, alignment) are sane, and its checkpoint round-trips and refuses tampering."""
from __future__ import annotations

import json

import pytest
import torch

from archipelago.config import ArchipelagoConfig
from archipelago.errors import CheckpointError
from archipelago.router import Router, expected_calibration_error, load_router, train_router
from archipelago.router.model import router_forward_flops

K = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from archipelago.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("router")
    cfg = ArchipelagoConfig()
    cfg.data.num_clusters = K
    cfg.router.steps, cfg.router.batch_size, cfg.router.hidden_size = 300, 64, 32
    cfg.expert.sample_steps = 8
    data = str(root / "data")
    prepare_data(cfg.data, data, progress=False)
    steps_seen: list[int] = []

    from archipelago.experts.callbacks import TrainCallback

    class Record(TrainCallback):
        def on_step(self, step, metrics):
            steps_seen.append(step)
            assert metrics["loss"] > 0 and 0 <= metrics["train_accuracy"] <= 1

    result = train_router(cfg, data, str(root / "router"), callbacks=[Record()])
    return {"root": root, "cfg": cfg, "data": data, "result": result, "steps_seen": steps_seen}


def test_router_learns_the_clusters(trained):
    m = trained["result"]["metrics"]
    bins = m["t_bins"]
    assert len(bins) == trained["cfg"].router.t_bins and bins[0]["t_lo"] == 0.0 and bins[-1]["t_hi"] == 1.0
    # Measured 0.97 at t < 0.2 after 300 steps (0.69 at t > 0.8); chance (largest shard) is 0.31.
    assert bins[0]["accuracy"] > 0.8 and bins[0]["accuracy"] > 2 * m["chance"]
    # Harder at high noise, but never worse than the prior by much; monotone-ish in t.
    assert bins[0]["accuracy"] >= bins[-1]["accuracy"] >= m["chance"] - 0.05
    assert 0.0 <= m["ece"] < 0.2          # measured 0.085
    assert m["alignment"] > 1.5 * m["chance"] and 0 < m["soft_alignment"] <= 1
    assert trained["steps_seen"][-1] == trained["cfg"].router.steps


def test_checkpoint_roundtrip_meta_and_reuse(trained, tmp_path):
    url = trained["result"]["router"]
    router, meta = load_router(url)
    assert isinstance(router, Router) and not router.training
    assert meta["num_experts"] == K and meta["kind"] == "router" and len(meta["data_manifest_sha256"]) == 64
    assert meta["metrics"]["alignment"] == trained["result"]["metrics"]["alignment"]
    x, t, y = torch.randn(5, 1, 16, 16), torch.rand(5), torch.arange(5)
    assert router(x, t, y).shape == (5, K)
    # Same data and config: reused, not retrained.
    again = train_router(trained["cfg"], trained["data"], url)
    assert again["cached"] and again["metrics"] == trained["result"]["metrics"]


def test_tampered_or_missing_router_is_one_line(trained, tmp_path):
    import shutil

    dst = tmp_path / "r"
    shutil.copytree(trained["result"]["router"], dst)
    blob = bytearray((dst / "router.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (dst / "router.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256 mismatch") as ei:
        load_router(str(dst))
    assert "\n" not in str(ei.value)
    with pytest.raises(CheckpointError, match="missing"):
        load_router(str(tmp_path / "none"))
    meta = json.loads((dst / "meta.json").read_text())
    meta["kind"] = "expert"
    (dst / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not an Archipelago router"):
        load_router(str(dst))


def test_unconditional_router_ignores_labels():
    torch.manual_seed(0)
    r = Router(1, 16, K, hidden_size=16, depth=2, num_classes=0).eval()
    with torch.no_grad():
        r.head.weight.normal_()
        x, t = torch.randn(3, 1, 16, 16), torch.rand(3)
        assert torch.equal(r(x, t, torch.tensor([1, 2, 3])), r(x, t, None))
    assert r.y_embedder is None


def test_router_is_cheap_next_to_an_expert():
    from archipelago.experts.dit import DiT

    r = Router(1, 16, K, hidden_size=64, depth=3, num_classes=10)
    e = DiT(16, 1, 2, 64, 4, 4)
    r_flops = router_forward_flops(r.config_dict)
    # DiT-T per-sample forward is ~30 MFLOPs; the default router must stay well under one expert.
    assert r_flops < 0.6 * 30e6
    assert sum(p.numel() for p in r.parameters()) < sum(p.numel() for p in e.parameters())


def test_ece():
    labels = torch.tensor([0, 1, 0, 1])
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0, abs=1e-6)
    wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])     # confident and always wrong
    assert expected_calibration_error(wrong, labels) == pytest.approx(1.0)
    half = torch.full((4, 2), 0.5)
    assert expected_calibration_error(half, labels) == pytest.approx(0.0, abs=1e-6)


def test_cli_train_router(trained, cli, tmp_path):
    out = tmp_path / "r"
    r = cli("train-router", "--data", trained["data"], "--out", str(out), "--set", "router.steps=5",
            "--set", "router.hidden_size=16", "--set", "router.depth=1", "--set", "expert.sample_steps=2",
            "--unconditional")
    assert r.returncode == 0, r.stderr
    assert "accuracy per t-bin" in r.stdout and (out / "meta.json").is_file()
    _, meta = load_router(str(out))
    assert meta["model"]["args"]["num_classes"] == 0 and meta["step"] == 5


def test_unconditional_router_from_config(trained):
    """router.class_conditional=false trains r(x_t, t): no label embedding, and a router trained the other way
    is not reused for it (the identity differs)."""
    from archipelago.router.train import read_router_meta

    cfg = trained["cfg"].model_copy(deep=True)
    cfg.router.class_conditional = False
    cfg.router.steps = 20
    out = str(trained["root"] / "router-xt")
    res = train_router(cfg, trained["data"], out)
    meta = read_router_meta(out)
    assert not res["cached"] and meta["model"]["args"]["num_classes"] == 0
    assert meta["identity"]["class_conditional"] is False
    assert read_router_meta(str(trained["root"] / "router"))["model"]["args"]["num_classes"] == 10
    router, _ = load_router(out)
    x, t = torch.randn(3, 1, 16, 16), torch.rand(3)
    assert torch.equal(router(x, t, torch.tensor([0, 1, 2])), router(x, t, None))   # the label is ignored
