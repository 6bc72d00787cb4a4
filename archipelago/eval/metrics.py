"""Scores of generated samples against reference data, all offline: Fréchet distance in the features of
our own classifier (FD), class-consistency (does the classifier agree with the conditioning label), and
FID / KID through torch-fidelity *only* when its Inception weights are already on disk."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

INCEPTION_ENV = "ARCHIPELAGO_INCEPTION_WEIGHTS"
# File name torch-fidelity gives the FID Inception weights in torch.hub's cache.
_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"


@torch.no_grad()
def extract_features(classifier: nn.Module, images: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Classifier features [N, F] (float64) of images [N,C,H,W], clamped to [-1, 1] first."""
    classifier.eval()
    x = images.float().clamp(-1, 1)
    return torch.cat([classifier.features(x[i:i + batch]) for i in range(0, len(x), batch)]).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to feature sets [N, F].

    Tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2;
    round-off imaginary parts and tiny negatives are dropped).
    """
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError("Fréchet distance needs at least 2 samples on each side")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def feature_distance(samples: torch.Tensor, reference: torch.Tensor, classifier: nn.Module) -> float:
    """Offline FD: Fréchet distance between samples and reference images in the classifier's features."""
    return frechet_distance(extract_features(classifier, samples), extract_features(classifier, reference))


@torch.no_grad()
def class_consistency(samples: torch.Tensor, labels: torch.Tensor, classifier: nn.Module) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    classifier.eval()
    x = samples.float().clamp(-1, 1)
    pred = torch.cat([classifier(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == labels.long()).float().mean())


def inception_weights() -> tuple[str | None, str]:
    """(path to local torch-fidelity Inception weights or None, one line saying why not)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return None, "FID/KID skipped: torch-fidelity is not installed (pip install torch-fidelity)"
    cand = [os.environ.get(INCEPTION_ENV)] if os.environ.get(INCEPTION_ENV) else []
    cand.append(str(Path(torch.hub.get_dir()) / "checkpoints" / _FIDELITY_FILE))
    for p in cand:
        if p and Path(p).is_file():
            return p, f"FID/KID with Inception weights at {p}"
    return None, (f"FID/KID skipped: no local Inception weights (set {INCEPTION_ENV} to the "
                  f"{_FIDELITY_FILE} file); nothing is downloaded")


def fid_kid(samples: torch.Tensor, reference: torch.Tensor) -> tuple[dict[str, float] | None, str]:
    """({'fid', 'kid'} or None, message) through torch-fidelity with local weights only."""
    path, msg = inception_weights()
    if path is None:
        return None, msg
    import torch_fidelity

    class _Images(torch.utils.data.Dataset):
        def __init__(self, x: torch.Tensor):
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            self.x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.x[i]

    kid_subset = max(2, min(len(samples), len(reference), 1000) // 2)
    out = torch_fidelity.calculate_metrics(
        input1=_Images(samples), input2=_Images(reference), fid=True, kid=True, kid_subset_size=kid_subset,
        feature_extractor_weights_path=path, cuda=torch.cuda.is_available(), verbose=False)
    return {"fid": float(out["frechet_inception_distance"]),
            "kid": float(out["kernel_inception_distance_mean"])}, msg


def memorisation(samples: torch.Tensor, train: torch.Tensor, held: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Mean pixel-space L2 distance of each sample to its nearest training image and to its nearest held-out
    image, the training set subsampled (seeded) to the held-out size so both sets are equally dense.
    ratio = nn_train / nn_holdout: about 1 for a model that generalises, well below 1 for one that copies
    its training images."""
    g = torch.Generator().manual_seed(seed)
    tr = train[torch.randperm(len(train), generator=g)[: len(held)]]
    flat = samples.float().clamp(-1, 1).flatten(1)

    def nn_dist(ref: torch.Tensor) -> float:
        return float(torch.cdist(flat, ref.float().flatten(1)).min(dim=1).values.mean())

    d_train, d_held = nn_dist(tr), nn_dist(held)
    return {"nn_train": d_train, "nn_holdout": d_held, "ratio": d_train / d_held if d_held > 0 else float("nan")}


def evaluate_samples(samples: torch.Tensor, labels: torch.Tensor | None, data_url: str, shard: int | None = None,
                     cache_url: str | None = None, with_fid: bool = True) -> dict[str, Any]:
    """Every score of `samples` against the prepared data at data_url: against its held-out split when it
    has one (samples are then scored on images no model trained on, plus a memorisation check), else
    against all shards (or shard `shard`).

    reference_floor: FD of a random real subset of the same size as `samples` to the same reference, i.e.
    the value a perfect generator would get at this sample size (FD is biased upward for small N). With a
    held-out reference the subset is drawn from the training shards: the floor is then real-vs-real across
    the split.
    """
    from archipelago.data.shards import read_all, read_holdout, read_shard
    from archipelago.eval.classifier import load_or_train_classifier

    classifier, info = load_or_train_classifier(data_url, cache_url=cache_url)
    held = read_holdout(data_url) if shard is None else None
    train = read_all(data_url)[0] if shard is None else read_shard(data_url, shard).images
    reference = held.images if held is not None else train
    if tuple(samples.shape[1:]) != tuple(reference.shape[1:]):
        from archipelago.errors import DataError

        raise DataError(f"samples have shape {tuple(samples.shape[1:])} but the reference data at {data_url} "
                        f"has {tuple(reference.shape[1:])}")
    ref_f = extract_features(classifier, reference)
    pool_f = extract_features(classifier, train) if held is not None else ref_f   # the floor's real subset
    idx = torch.randperm(len(pool_f), generator=torch.Generator().manual_seed(0))[: min(len(samples),
                                                                                       len(pool_f))]
    out: dict[str, Any] = {
        "n_samples": len(samples), "reference": data_url, "shard": shard, "n_reference": len(reference),
        "reference_split": "holdout" if held is not None else ("shards" if shard is None else f"shard {shard}"),
        "feature_distance": frechet_distance(extract_features(classifier, samples), ref_f),
        "reference_floor": frechet_distance(pool_f[idx.numpy()], ref_f) if len(idx) >= 2 else None,
        "memorisation": memorisation(samples, train, held.images) if held is not None else None,
        "memorisation_ratio": None,
        "class_consistency": None if labels is None else class_consistency(samples, labels, classifier),
        "classifier_test_accuracy": info.get("test_accuracy"), "classifier_cache": info.get("cache_url"),
        "fid": None, "kid": None, "fid_note": None}
    if out["memorisation"] is not None:
        out["memorisation_ratio"] = out["memorisation"]["ratio"]
    if with_fid:
        scores, note = fid_kid(samples, reference)
        out["fid_note"] = note
        if scores:
            out.update(scores)
    return out
