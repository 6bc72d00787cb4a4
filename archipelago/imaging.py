"""Images people can look at: tensors in [-1, 1] -> PNG grids (and GIFs for video), written atomically
through storage so a half-written picture never looks complete."""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from archipelago import storage


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C,H,W] or [N,C,H,W] in [-1,1] -> uint8 HWC / NHWC."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """[N,C,H,W] in [-1,1] -> one PIL image laid out nrow per row with `pad` pixels between tiles."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    arr = to_uint8(images)
    canvas = np.zeros((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y0:y0 + h, x0:x0 + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def grid_png_bytes(images: torch.Tensor, nrow: int | None = None, scale: int = 4) -> bytes:
    """A PNG grid of [N,C,H,W] in [-1,1] as bytes (what `save_grid` writes; the server answers with it)."""
    buf = io.BytesIO()
    grid(images, nrow=nrow, scale=scale).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, url: str, nrow: int | None = None, scale: int = 4) -> str:
    """Write a PNG grid to `url` atomically; returns its sha256."""
    return storage.write_bytes(url, grid_png_bytes(images, nrow=nrow, scale=scale))


def gif_bytes(frames: torch.Tensor, fps: int = 8, scale: int = 4) -> bytes:
    """[F,C,H,W] (one video) or [N,F,C,H,W] (a row of videos side by side) -> animated GIF bytes."""
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    n, f = frames.shape[:2]
    pics = [grid(frames[:, i], nrow=n, scale=scale).convert("P") for i in range(f)]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def save_gif(frames: torch.Tensor, url: str, fps: int = 8, scale: int = 4) -> str:
    """Write `gif_bytes` to url atomically; returns its sha256."""
    return storage.write_bytes(url, gif_bytes(frames, fps=fps, scale=scale))
