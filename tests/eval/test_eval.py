"""Offline evaluation: the feature classifier really classifies digits, the Fréchet distance is 0 for a set
against itself, large for noise, and matches the closed form for Gaussians; FID never downloads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from archipelago.data.shards import read_all
from archipelago.errors import DataError
from archipelago.eval import (
    class_consistency,
    evaluate_samples,
    feature_distance,
    fid_kid,
    frechet_distance,
    load_or_train_classifier,
    split_data,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from archipelago.config import DataConfig
    from archipelago.data.prepare import prepare_data

    url = str(tmp_path_factory.mktemp("eval") / "data")
    prepare_data(DataConfig(num_clusters=2), url, progress=False)
    clf, info = load_or_train_classifier(url)
    return {"url": url, "clf": clf, "info": info}


def test_classifier_is_accurate_on_the_test_split(data):
    split = split_data(data["url"])
    # The test split is the data's held-out split (10% of the source), the training split every shard.
    assert len(split.test_x) == 180 and len(split.train_x) == 1797 - 180
    assert data["info"]["test_accuracy"] > 0.9            # measured 0.98
    assert class_consistency(split.test_x, split.test_y, data["clf"]) == pytest.approx(
        data["info"]["test_accuracy"])
    # Wrong labels are not consistent.
    assert class_consistency(split.test_x, (split.test_y + 1) % 10, data["clf"]) < 0.1


def test_classifier_is_cached(data):
    import time

    t0 = time.perf_counter()
    clf, info = load_or_train_classifier(data["url"])
    assert time.perf_counter() - t0 < 2.0 and info["key"] == data["info"]["key"]
    for a, b in zip(clf.state_dict().values(), data["clf"].state_dict().values()):
        assert torch.equal(a, b)


def test_feature_distance_self_zero_noise_large(data):
    x = read_all(data["url"])[0]
    split = split_data(data["url"])
    clf = data["clf"]
    assert feature_distance(x, x, clf) == pytest.approx(0.0, abs=1e-6)
    real = feature_distance(split.test_x, split.train_x, clf)
    noise = feature_distance(torch.randn(359, 1, 16, 16).clamp(-1, 1), split.train_x, clf)
    blank = feature_distance(torch.full((359, 1, 16, 16), -1.0) + 0.01 * torch.randn(359, 1, 16, 16),
                             split.train_x, clf)
    assert noise > 50 * real and blank > 10 * real, (real, noise, blank)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(1.0, 2.0, size=(20000, 3))
    # ||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) = 3*1 + 3*(1 + 4 - 2*2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_fid_is_skipped_without_local_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHIPELAGO_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    scores, msg = fid_kid(torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16))
    assert scores is None and msg.startswith("FID/KID skipped") and "\n" not in msg


def test_evaluate_samples_report(data):
    split = split_data(data["url"])
    res = evaluate_samples(split.test_x[:150], split.test_y[:150], data["url"], shard=0)
    assert res["n_samples"] == 150 and res["shard"] == 0 and res["class_consistency"] > 0.9
    assert res["reference_floor"] > 0 and res["feature_distance"] > 0 and res["fid"] is None
    with pytest.raises(DataError, match="shape"):
        evaluate_samples(torch.zeros(4, 1, 8, 8), None, data["url"])


def test_dit_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from archipelago.eval.flops import dit_forward_flops, train_flops
    from archipelago.experts.dit import DiT

    m = DiT(16, 1, 2, 64, 4, 4).eval()
    x, t, y = torch.randn(8, 1, 16, 16), torch.rand(8), torch.arange(8)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x, t, y)
    counted = fc.get_total_flops() / 8          # linear layers and convs; the counter skips CPU SDPA
    attention = 4 * 4 * 64 * 64 * 64            # depth x (QK^T + AV: 2 T^2 D multiply-adds = 4 T^2 D FLOPs)
    assert dit_forward_flops(m.config_dict) - attention == pytest.approx(counted, rel=0.01), counted
    assert train_flops(10, 4, 5) == 600
