"""CLIP and SigLIP image embedders for clustering, through transformers (local weights only).

Why transformers and not timm/open_clip: both of those import torchvision, and the torchvision wheels on PyPI
are CUDA builds that do not load next to the CPU torch we pin ("operator torchvision::nms does not exist");
transformers needs no torchvision. The directory is a `save_pretrained` layout of a CLIP or SigLIP model
(full model or vision tower), loaded with local_files_only and safetensors only: nothing is downloaded and
nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from archipelago.errors import DataError

log = logging.getLogger(__name__)

# Defaults of the released checkpoints' image processors (used when no preprocessor_config.json is present).
_NORM = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
         "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


class VisionEmbedder:
    """L2-normalised image features of a CLIP (projected image embeds) or SigLIP (pooled) vision tower."""

    def __init__(self, kind: Literal["clip", "siglip"], weights: str | None, batch_size: int = 64,
                 progress: bool = True, device: str | None = None):
        hint = f"{kind} embedder needs local weights: set data.embedder_weights=DIR (a transformers " \
               "save_pretrained directory); nothing is downloaded"
        if not weights:
            raise DataError(hint)
        if "://" in weights and not weights.startswith("file://"):
            raise DataError(f"{hint} (got a remote URL {weights!r}; copy the weights to local disk)")
        self.path = Path(weights.removeprefix("file://")).expanduser()
        if not (self.path / "config.json").is_file():
            raise DataError(f"{hint} ({self.path} has no config.json)")
        self.name, self.kind, self.batch_size, self.progress = kind, kind, batch_size, progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        mean, std = _NORM[kind]
        pre = self.path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._model: torch.nn.Module | None = None

    def _load(self) -> torch.nn.Module:
        if self._model is None:
            from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

            cls = CLIPVisionModelWithProjection if self.kind == "clip" else SiglipVisionModel
            try:
                model = cls.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
            except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError
                raise DataError(f"{self.path}: not a loadable {self.kind} model ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
            self._model = model.eval().requires_grad_(False).to(self.device)
            self.image_size = int(model.config.image_size)
        return self._model

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        """[N, C, H, W] (video: [N, C, F, H, W], mean frame) in [-1, 1] -> float32 [N, D], unit norm."""
        import torch.nn.functional as F
        from rich.progress import track

        model = self._load()
        x = images.float()
        if x.ndim == 5:
            x = x.mean(dim=2)                                        # [N, C, H, W]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)                                 # [N, 3, H, W]
        starts = range(0, x.shape[0], self.batch_size)
        if self.progress and len(starts) > 1:
            from rich.console import Console

            starts = track(starts, description=f"embed ({self.kind})", transient=True,
                           console=Console(stderr=True))
        feats = []
        for i in starts:
            b = F.interpolate((x[i:i + self.batch_size] + 1) / 2, size=(self.image_size,) * 2, mode="bicubic",
                              align_corners=False).clamp(0, 1)       # [B, 3, S, S] in [0, 1]
            b = ((b - self.mean) / self.std).to(self.device)
            out = model(pixel_values=b)
            f = out.image_embeds if self.kind == "clip" else out.pooler_output   # [B, D]
            feats.append(F.normalize(f.float(), dim=-1).cpu())
        return torch.cat(feats).numpy().astype(np.float32)
