"""A small CNN classifier of the prepared data: the offline feature space for Fréchet distance and the judge
of class-consistency. Inception weights cannot be downloaded here, so we train our own feature extractor:
seeded, in seconds on a CPU, on a fixed *train* split of the source, and cached as safetensors."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archipelago import storage
from archipelago.errors import CheckpointError, StorageError

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2
SPLIT_SEED = 1234
CACHE_DIR = "eval"


class DigitClassifier(nn.Module):
    """Four 3x3 convs (two with stride 2) -> global average pool -> `feature_dim` features -> logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config_dict = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                            "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, feature_dim, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N,C,H,W] in [-1,1] -> features [N, feature_dim] (the FD space)."""
        return self.body(x).mean(dim=(2, 3))                                      # [N, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))                                        # [N, num_classes]


@dataclass
class SplitData:
    """The prepared data split by source position: train (classifier fitting) and test (its accuracy)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split_data(data_url: str) -> SplitData:
    """The classifier's train/test data. With a held-out split in the data: train on every shard, test on
    the held-out samples. Without one: every shard, split by source position with a fixed seed (same split
    for any K or partitioner of the same source: the split depends on the source index, not on the shard)."""
    from archipelago.data.shards import load_manifest, read_holdout, read_shard

    m = load_manifest(data_url)
    shards = [read_shard(data_url, k, manifest=m) for k in range(m.num_clusters)]
    x = torch.cat([s.images for s in shards])
    y = torch.cat([s.labels for s in shards])
    held = read_holdout(data_url, manifest=m)
    if held is not None:
        return SplitData(x, y, held.images, held.labels)
    index = torch.cat([s.index for s in shards])
    perm = torch.randperm(m.num_samples, generator=torch.Generator().manual_seed(SPLIT_SEED))
    is_test = torch.zeros(int(max(m.num_samples, int(index.max()) + 1)), dtype=torch.bool)
    is_test[perm[: round(TEST_FRACTION * m.num_samples)]] = True
    t = is_test[index]
    return SplitData(x[~t], y[~t], x[t], y[t])


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1 pixel (cheap augmentation; samples are never perfectly centred)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / max(1, len(x))


def train_classifier(data: SplitData, num_classes: int, seed: int = 0, steps: int = 400,
                     batch_size: int = 128, lr: float = 4e-3) -> tuple[DigitClassifier, dict[str, Any]]:
    """Fit a DigitClassifier on data.train_*; returns (model in eval mode, {test_accuracy, ...})."""
    torch.manual_seed(seed)
    model = DigitClassifier(in_channels=data.train_x.shape[1], num_classes=num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())
        idx = torch.randint(len(data.train_x), (batch_size,), generator=g)
        loss = F.cross_entropy(model(_shift(data.train_x[idx], g)), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    info = {"test_accuracy": accuracy(model, data.test_x, data.test_y),
            "train_accuracy": accuracy(model, data.train_x, data.train_y),
            "train_samples": len(data.train_x), "test_samples": len(data.test_x), "seed": seed,
            "steps": steps}
    return model, info


def _cache_key(manifest_sha: str, seed: int, steps: int) -> str:
    blob = json.dumps({"manifest": manifest_sha, "seed": seed, "steps": steps, "split_seed": SPLIT_SEED,
                       "test_fraction": TEST_FRACTION, "arch": "DigitClassifier-v1"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train_classifier(data_url: str, cache_url: str | None = None, seed: int = 0,
                             steps: int = 400) -> tuple[DigitClassifier, dict[str, Any]]:
    """The classifier for data_url: read from the cache (default `<data_url>/eval/classifier-<key>
    .safetensors`, key = manifest sha256 + training settings), else trained and written there."""
    from safetensors.torch import load, save

    from archipelago.data.shards import load_manifest, manifest_sha256

    m = load_manifest(data_url)
    key = _cache_key(manifest_sha256(data_url), seed, steps)
    url = cache_url or storage.join(data_url, CACHE_DIR, f"classifier-{key}.safetensors")
    try:
        if storage.exists(url):
            raw = storage.read_bytes(url)
            info = _metadata(raw)
            if info.get("key") == key:
                model = DigitClassifier(**info["config"])
                model.load_state_dict(load(raw), strict=True)
                return model.eval(), info
            log.info("%s: cached classifier is for other data/settings; retraining", url)
    except (StorageError, CheckpointError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        log.warning("%s: cached classifier unusable (%s); retraining", url, exc)
    model, info = train_classifier(split_data(data_url), m.num_classes, seed=seed, steps=steps)
    info = {**info, "key": key, "config": model.config_dict, "cache_url": url}
    storage.write_bytes(url, save({k: v.contiguous() for k, v in model.state_dict().items()},
                                  metadata={"archipelago": json.dumps(info, sort_keys=True)}))
    return model, info


def _metadata(raw: bytes) -> dict[str, Any]:
    """The JSON we stored in a safetensors header (raises CheckpointError if absent/corrupt)."""
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        return json.loads(header["__metadata__"]["archipelago"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"not a cached classifier ({type(exc).__name__})") from None
