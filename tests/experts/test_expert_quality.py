"""A trained tiny expert must generate samples that look like its shard: its offline feature distance
(Fréchet distance in the digits classifier's feature space) beats an untrained expert and plain noise by
a wide margin."""
from __future__ import annotations

import pytest
import torch

from archipelago.config import load_config
from archipelago.data.prepare import prepare_data
from archipelago.data.shards import load_manifest, read_shard
from archipelago.eval.classifier import load_or_train_classifier
from archipelago.eval.metrics import feature_distance
from archipelago.experts.checkpoint import load_expert
from archipelago.experts.dit import build_dit
from archipelago.experts.train import train_expert
from archipelago.generate import generate


@pytest.mark.e2e
def test_trained_expert_beats_untrained_and_noise(tmp_path):
    cfg = load_config(None, ["data.num_clusters=2", "expert.hidden_size=64", "expert.depth=3",
                             "expert.steps=250", "expert.batch_size=64", "expert.lr=0.001",
                             "expert.checkpoint_every=250", "expert.ema_decay=0.99", "tracking.enabled=false",
                             "islands.flop_match=none"])   # the expert itself at batch 64, not a share of it
    data_url = str(tmp_path / "data")
    prepare_data(cfg.data, data_url, progress=False)
    result = train_expert(cfg, 0, data_url, str(tmp_path / "expert-0"))
    trained, _ = load_expert(result["final_checkpoint"])

    manifest = load_manifest(data_url)
    c, h, w = manifest.image_shape
    untrained = build_dit(cfg.expert, input_size=h, in_channels=c, num_classes=manifest.num_classes)
    shard = read_shard(data_url, 0)
    classifier, _ = load_or_train_classifier(data_url)
    n = 128
    classes = shard.labels[:n]
    fd_trained = feature_distance(
        generate(trained, n, cfg_scale=1.0, seed=1, steps=24, classes=classes), shard.images, classifier)
    fd_untrained = feature_distance(
        generate(untrained, n, cfg_scale=1.0, seed=1, steps=24, classes=classes), shard.images, classifier)
    fd_noise = feature_distance(torch.randn(n, c, h, w).clamp(-1, 1), shard.images, classifier)
    print(f"FD trained {fd_trained:.2f}  untrained {fd_untrained:.2f}  noise {fd_noise:.2f}")
    assert fd_trained < 0.5 * min(fd_untrained, fd_noise), (fd_trained, fd_untrained, fd_noise)
