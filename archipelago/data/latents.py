"""Latent diffusion: a diffusers AutoencoderKL encodes images to latents during `data prepare`, experts and the
router learn those latents as plain [C, H, W] tensors, and `generate` decodes with the same VAE.

The VAE is identified by the sha256 of its config and weights files, recorded in the manifest and in every
checkpoint (`data_space`), so a model trained on one VAE's latents is never decoded with another VAE or fed
pixels. Weights come from a local directory; the hub is used only with `data.vae.allow_download: true`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from archipelago.config import VaeConfig
from archipelago.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

_VAE_FILES = ("config.json", ".safetensors")


class LatentSpace(BaseModel):
    """What the manifest records about latents: which VAE, how they were scaled, and the shapes."""
    model_config = ConfigDict(extra="forbid")
    vae_path: str = Field(description="Where the VAE was loaded from (local directory or hub id).")
    vae_sha256: str = Field(description="sha256 over the VAE's config.json and .safetensors files.")
    scaling_factor: float = Field(description="latent = (mean - shift_factor) * scaling_factor.")
    shift_factor: float = Field(0.0, description="See scaling_factor (0 for SD-style VAEs).")
    latent_shape: list[int] = Field(description="[C, H, W] of one latent.")
    pixel_shape: list[int] = Field(description="[C, H, W] of one decoded image.")


def vae_sha256(directory: Path) -> str:
    """Identity of a VAE directory: sha256 of the sorted (file name, file sha256) of config + weights."""
    entries = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name.endswith(_VAE_FILES):
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            entries.append((f.name, h.hexdigest()))
    if not any(name.endswith(".safetensors") for name, _ in entries):
        raise DataError(f"{directory}: no .safetensors weights for the VAE (only safetensors are loaded: "
                        "pickled .bin weights could run code)")
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _resolve(cfg: VaeConfig) -> Path:
    """The local directory holding the VAE's config.json and weights (downloading only when allowed)."""
    path = Path(cfg.path.removeprefix("file://")).expanduser()
    if not path.exists():
        if not cfg.allow_download:
            raise DataError(f"data.vae.path: {cfg.path} does not exist; point it at a local diffusers "
                            "AutoencoderKL directory (nothing is downloaded unless data.vae.allow_download=true)")
        try:
            from huggingface_hub import snapshot_download

            sub = f"{cfg.subfolder}/" if cfg.subfolder else ""
            path = Path(snapshot_download(cfg.path, allow_patterns=[f"{sub}config.json", f"{sub}*.safetensors"]))
        except Exception as exc:  # noqa: BLE001 - network/hub errors of every kind
            raise DataError(f"data.vae.path: cannot download {cfg.path!r} ({type(exc).__name__})") from None
    if cfg.subfolder:
        path = path / cfg.subfolder
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: no config.json; data.vae.path must be a diffusers AutoencoderKL directory "
                        "(save_pretrained layout)")
    return path


class VaeCodec:
    """images in [-1, 1] <-> scaled latents, with one AutoencoderKL (eval mode, no grad, batched)."""

    def __init__(self, cfg: VaeConfig, device: str | torch.device | None = None):
        from diffusers import AutoencoderKL

        self.cfg = cfg
        self.dir = _resolve(cfg)
        self.sha256 = vae_sha256(self.dir)
        try:
            self.vae = AutoencoderKL.from_pretrained(str(self.dir), local_files_only=True, use_safetensors=True,
                                                     low_cpu_mem_usage=False)   # no accelerate needed
        except Exception as exc:  # noqa: BLE001 - diffusers raises OSError/ValueError/EnvironmentError
            raise DataError(f"{self.dir}: not a loadable diffusers AutoencoderKL ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae.eval().requires_grad_(False).to(self.device)
        c = self.vae.config
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = float(getattr(c, "shift_factor", None) or 0.0)
        self.in_channels, self.out_channels = int(c.in_channels), int(c.out_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> latents [N, c, h, w]: the posterior mean (deterministic, so a resumed
        or repeated preparation writes the same bytes), shifted and scaled to about unit variance."""
        if images.ndim != 4:
            raise DataError(f"data.vae encodes images [N, C, H, W]; got {tuple(images.shape)} (video sources "
                            "are not supported with a VAE)")
        x = images
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)                            # grayscale -> RGB
        if x.shape[1] != self.in_channels:
            raise DataError(f"{self.dir}: VAE takes {self.in_channels} channels, images have {x.shape[1]}")
        out = []
        for i in range(0, x.shape[0], self.cfg.batch_size):
            b = x[i:i + self.cfg.batch_size].to(self.device, torch.float32)
            z = self.vae.encode(b).latent_dist.mean             # [B, c, h, w]
            out.append(((z - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, c, h, w] -> images [N, C, H, W] in [-1, 1] (clamped)."""
        out = []
        for i in range(0, latents.shape[0], self.cfg.batch_size):
            z = latents[i:i + self.cfg.batch_size].to(self.device, torch.float32)
            out.append(self.vae.decode(z / self.scaling_factor + self.shift_factor).sample.float().cpu())
        return torch.cat(out).clamp(-1.0, 1.0)

    def space(self, latent_shape: list[int], pixel_shape: list[int]) -> LatentSpace:
        return LatentSpace(vae_path=self.cfg.path + (f"/{self.cfg.subfolder}" if self.cfg.subfolder else ""),
                           vae_sha256=self.sha256, scaling_factor=self.scaling_factor,
                           shift_factor=self.shift_factor, latent_shape=latent_shape,
                           pixel_shape=[self.out_channels, *pixel_shape[1:]])


# ----------------------------------------------------------------------------------------------------
# The data space a model was trained in (checkpoint meta `data_space`) and the checks that use it
# ----------------------------------------------------------------------------------------------------

def data_space(latent: LatentSpace | None) -> dict[str, Any]:
    """{'kind': 'pixel'} or {'kind': 'latent', **LatentSpace}: what checkpoints record."""
    return {"kind": "pixel"} if latent is None else {"kind": "latent", **latent.model_dump(mode="json")}


def _describe(space: dict[str, Any]) -> str:
    if space.get("kind") != "latent":
        return "pixels"
    return f"latents of VAE {str(space.get('vae_sha256'))[:12]}… ({space.get('vae_path')})"


def check_data_space(have: dict[str, Any] | None, want: dict[str, Any], where: str, what: str) -> None:
    """Refuse (one CheckpointError line) a model trained in another data space than `want`.

    have: the checkpoint's `data_space` (None: written before latents existed, i.e. pixels).
    """
    have = have or {"kind": "pixel"}
    same_kind = have.get("kind") == want.get("kind")
    if same_kind and (have.get("kind") != "latent" or have.get("vae_sha256") == want.get("vae_sha256")):
        return
    fix = ("set data.vae.path to that VAE" if have.get("kind") == "latent" else "unset data.vae") \
        + " or use another output URL"
    raise CheckpointError(f"{where}: trained on {_describe(have)}, but {what} {_describe(want)}; {fix}")


def decoder_for(space: dict[str, Any] | None, where: str, vae_path: str | None = None,
                device: str | torch.device = "cpu") -> VaeCodec | None:
    """The VAE that decodes a model's samples (None for pixel models), loaded from `vae_path` or from the path
    the checkpoint recorded, and refused unless its sha256 is the one the model was trained with."""
    space = space or {"kind": "pixel"}
    if space.get("kind") != "latent":
        if vae_path:
            raise CheckpointError(f"{where}: trained on pixels; --vae {vae_path} cannot decode its samples "
                                  "(drop --vae)")
        return None
    path = vae_path or str(space.get("vae_path"))
    try:
        codec = VaeCodec(VaeConfig(path=path), device=device)
    except DataError as exc:
        raise CheckpointError(f"{where}: trained on latents; its VAE cannot be loaded ({exc}); pass the VAE "
                              "directory with --vae") from None
    if codec.sha256 != space.get("vae_sha256"):
        raise CheckpointError(f"{where}: trained on {_describe(space)}; the VAE at {path} is another one "
                              f"(sha256 {codec.sha256[:12]}…); decode with the same VAE")
    return codec
