"""Feature spaces that k-means clusters in. The default (`pixel_pca`) is offline and deterministic; `dinov2`
(the paper's choice) is used only when its weights are already on local disk: nothing is ever downloaded."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from archipelago.config import DataConfig
from archipelago.errors import DataError

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """Maps samples [N, C, H, W] (video: [N, C, F, H, W]) in [-1, 1] to features float32 [N, D]."""
    name: str

    def embed(self, images: torch.Tensor) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------------
# pixel_pca: standardize pixels, PCA to embed_dim (sklearn); offline and seeded
# ----------------------------------------------------------------------------------------------------

class PixelPCAEmbedder:
    """Standardized pixels projected on their top `dim` principal components.

    Video clips need a different pixel view, because raw pixels of a moving sprite mostly encode *where*
    it is, not *what* it is (k-means on flattened moving-digits clips is near chance). `video="fft"`
    (default) uses the per-frame 2-D Fourier magnitude averaged over frames: it is invariant to
    translating content inside an empty canvas, so clusters follow the content. `video="flatten"` uses
    all frames' pixels, `video="mean"` the mean frame.
    """
    name = "pixel_pca"

    def __init__(self, dim: int = 32, seed: int = 0, whiten: bool = False,
                 video: Literal["fft", "flatten", "mean"] = "fft"):
        if video not in ("fft", "flatten", "mean"):
            raise DataError(f"pixel_pca: video={video!r} must be 'fft', 'flatten' or 'mean'")
        self.dim, self.seed, self.whiten, self.video = dim, seed, whiten, video

    def embed(self, images: torch.Tensor) -> np.ndarray:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        x = images.detach().float().cpu()
        if x.ndim == 5 and self.video == "mean":
            x = x.mean(dim=2)                                   # [N, C, H, W]
        elif x.ndim == 5 and self.video == "fft":
            x = torch.fft.rfft2((x + 1) / 2).abs().mean(dim=2)  # [N, C, H, W//2+1], background = 0
        x = x.reshape(x.shape[0], -1).numpy().astype(np.float64)  # [N, P]
        x = StandardScaler().fit_transform(x)                   # zero-variance pixels stay 0
        dim = min(self.dim, x.shape[0], x.shape[1])
        # A full SVD is exact (no randomness); the randomized solver is only used when the matrix is large,
        # and then random_state fixes it. Either way the same seed gives the same features.
        solver = "full" if x.shape[0] * x.shape[1] <= 4_000_000 else "randomized"
        pca = PCA(n_components=dim, whiten=self.whiten, svd_solver=solver, random_state=self.seed)
        z = pca.fit_transform(x)
        return z.astype(np.float32)                             # [N, dim]


# ----------------------------------------------------------------------------------------------------
# classifier: penultimate features of a small CNN fitted to the labels (semantic, offline)
# ----------------------------------------------------------------------------------------------------

class ClassifierEmbedder:
    """Penultimate features of `eval.classifier.DigitClassifier` trained (seeded, seconds on a CPU) on the
    samples being clustered and their labels.

    Why: the DDM paper clusters DINOv2 features, in which a class mostly sits in one cluster; pixel PCA on
    digits splits every class over several shards (class majority share ~0.6 at K=4), which caps what a
    class-conditional top-1 router can reach. Without DINOv2 weights, a network trained on the labels is
    the semantic feature space we can build offline. It needs labels (a flat folder has none) and sees
    only the training split (prepare passes no held-out samples).
    """
    name = "classifier"
    needs_labels = True

    def __init__(self, seed: int = 0, steps: int = 400):
        self.seed, self.steps = seed, steps

    def embed(self, images: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0) -> np.ndarray:
        from archipelago.eval.classifier import SplitData, accuracy, train_classifier
        from archipelago.eval.metrics import extract_features

        if labels is None or num_classes < 2:
            raise DataError("data.embedder=classifier needs labelled data (at least 2 classes); this source "
                            "has none: use pixel_pca or dinov2")
        if images.ndim != 4:
            raise DataError(f"data.embedder=classifier handles images [N,C,H,W], got {tuple(images.shape)}; "
                            f"use pixel_pca for video")
        empty = images[:0]
        model, _ = train_classifier(SplitData(images, labels, empty, labels[:0]), num_classes, seed=self.seed,
                                    steps=self.steps)
        log.info("classifier embedder: train accuracy %.3f", accuracy(model, images, labels))
        return extract_features(model, images).astype(np.float32)    # [N, feature_dim]


# ----------------------------------------------------------------------------------------------------
# dinov2: local weights only (timm, or a local torch.hub checkout)
# ----------------------------------------------------------------------------------------------------

_NO_WEIGHTS = "dinov2 embedder needs local weights: set data.dinov2_weights=PATH; nothing is downloaded"

# DINOv2 ViT variants, keyed by token width (read from the weights' cls_token).
_DINOV2_ARCH: dict[int, tuple[str, str]] = {
    384: ("vit_small_patch14_dinov2", "dinov2_vits14"),
    768: ("vit_base_patch14_dinov2", "dinov2_vitb14"),
    1024: ("vit_large_patch14_dinov2", "dinov2_vitl14"),
    1536: ("vit_giant_patch14_dinov2", "dinov2_vitg14"),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise DataError(f"{path}: cannot read dinov2 weights ({type(exc).__name__}); "
                        "point data.dinov2_weights at a .pth/.safetensors state dict") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise DataError(f"{path}: not a state dict; point data.dinov2_weights at a .pth/.safetensors file")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


class Dinov2Embedder:
    """CLS features of a DINOv2 ViT whose weights are a local file (or a local torch.hub repo directory).

    The constructor validates everything (path set, path exists, a model library importable) so a bad
    setup fails at once, before any data is read. Grayscale is repeated to 3 channels; video uses the mean
    frame; inputs are resized to `input_size` (a multiple of the patch size 14) and ImageNet-normalized.
    """
    name = "dinov2"

    def __init__(self, weights: str | None, input_size: int = 224, batch_size: int = 64,
                 device: str | None = None):
        if not weights:
            raise DataError(_NO_WEIGHTS)
        if "://" in weights and not weights.startswith("file://"):
            raise DataError(f"{_NO_WEIGHTS} (got a remote URL {weights!r}; copy the weights to local disk)")
        path = Path(weights.removeprefix("file://")).expanduser()
        if not path.exists():
            raise DataError(f"{_NO_WEIGHTS} ({path} does not exist)")
        if input_size % 14:
            raise DataError(f"dinov2: input_size={input_size} must be a multiple of the patch size 14")
        self.path, self.input_size, self.batch_size = path, input_size, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._build: Callable[[], torch.nn.Module] = self._builder()

    def _builder(self) -> Callable[[], torch.nn.Module]:
        """Pick how to build the model now (so a missing library fails in the constructor)."""
        if self.path.is_dir():
            if not (self.path / "hubconf.py").is_file():
                raise DataError(f"{self.path}: a directory for data.dinov2_weights must be a local torch.hub "
                                "checkout of facebookresearch/dinov2 (with hubconf.py) holding one weights "
                                "file")
            return self._build_hub
        try:
            import timm  # noqa: F401
        except ImportError:
            raise DataError("dinov2 embedder with a weights file needs timm (pip install timm), or set "
                            "data.dinov2_weights to a local torch.hub checkout of dinov2; nothing is "
                            "downloaded") from None
        return self._build_timm

    def _build_timm(self) -> torch.nn.Module:
        import timm

        sd = _load_state_dict(self.path)
        width = int(sd["cls_token"].shape[-1]) if "cls_token" in sd else 0
        if width not in _DINOV2_ARCH:
            raise DataError(f"{self.path}: not DINOv2 ViT weights (cls_token width {width}; expected one of "
                            f"{sorted(_DINOV2_ARCH)})")
        model = timm.create_model(_DINOV2_ARCH[width][0], pretrained=False, num_classes=0,
                                  img_size=self.input_size)
        # Weights saved at 518 px carry a larger pos_embed; timm resamples it to our input size.
        if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=1)
        # strict=False: official checkpoints carry extras timm does not use (e.g. mask_token); only missing
        # tensors mean the weights are not this architecture.
        missing = model.load_state_dict(sd, strict=False).missing_keys
        if missing:
            raise DataError(f"{self.path}: weights do not match {_DINOV2_ARCH[width][0]} "
                            f"(missing {len(missing)} tensors, e.g. {missing[0]})")
        return model

    def _build_hub(self) -> torch.nn.Module:
        files = sorted(p for p in self.path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))
        if len(files) != 1:
            raise DataError(f"{self.path}: expected exactly one .pth/.safetensors weights file in the hub "
                            f"directory, found {len(files)}")
        sd = _load_state_dict(files[0])
        width = int(sd["cls_token"].shape[-1]) if "cls_token" in sd else 0
        if width not in _DINOV2_ARCH:
            raise DataError(f"{files[0]}: not DINOv2 ViT weights (cls_token width {width})")
        # source='local' + pretrained=False: torch.hub only imports hubconf.py from disk.
        model = torch.hub.load(str(self.path), _DINOV2_ARCH[width][1], source="local", pretrained=False)
        model.load_state_dict(sd, strict=True)
        return model

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        import torch.nn.functional as F

        model = self._build().eval().to(self.device)
        x = images.float()
        if x.ndim == 5:
            x = x.mean(dim=2)                                       # [N, C, H, W] mean frame
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)                                # [N, 3, H, W]
        mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        feats = []
        for i in range(0, x.shape[0], self.batch_size):
            b = x[i:i + self.batch_size].to(self.device)
            b = F.interpolate((b + 1) / 2, size=(self.input_size,) * 2, mode="bicubic", align_corners=False)
            feats.append(model((b.clamp(0, 1) - mean) / std).float().cpu())  # [B, D] CLS features
        return torch.cat(feats).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------

EMBEDDERS: dict[str, Callable[[DataConfig], Embedder]] = {
    "pixel_pca": lambda cfg: PixelPCAEmbedder(dim=cfg.embed_dim, seed=cfg.seed),
    "classifier": lambda cfg: ClassifierEmbedder(seed=cfg.seed),
    "dinov2": lambda cfg: Dinov2Embedder(cfg.dinov2_weights),
    "clip": lambda cfg: _vision("clip", cfg),
    "siglip": lambda cfg: _vision("siglip", cfg),
}


def _vision(kind: Literal["clip", "siglip"], cfg: DataConfig) -> Embedder:
    from archipelago.data.pretrained import VisionEmbedder  # imports transformers only when chosen

    return VisionEmbedder(kind, cfg.embedder_weights, batch_size=cfg.embed_batch_size)


def get_embedder(name: str, cfg: DataConfig) -> Embedder:
    """Build the embedder `name` from `cfg` (fails at once on a bad setup, e.g. dinov2 without weights)."""
    if name not in EMBEDDERS:
        raise DataError(f"data.embedder={name!r}: unknown embedder; known: {', '.join(EMBEDDERS)}")
    return EMBEDDERS[name](cfg)
