"""Where samples come from: the embedded sklearn digits, an image folder read through fsspec, and a seeded
moving-digits video source. Every source returns one `SourceData` with values in [-1, 1], so the rest of
the pipeline (embed -> partition -> shards) never cares which one it got."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from archipelago import storage
from archipelago.config import DataConfig
from archipelago.errors import DataError, StorageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class SourceData:
    """Samples of one source, ready to embed and shard."""
    images: torch.Tensor  # float32 [N, C, H, W] (video: [N, C, F, H, W]) in [-1, 1]
    labels: torch.Tensor  # int64 [N]; class ids in [0, num_classes)
    num_classes: int      # 1 when the source has no classes (flat folder)
    name: str             # short description for manifests and logs, e.g. "digits" or "image_folder:s3://b/x"

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to size x size; antialias so downscaling does not alias."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ----------------------------------------------------------------------------------------------------
# sklearn digits (1,797 real 8x8 images, shipped with scikit-learn: no download)
# ----------------------------------------------------------------------------------------------------

def _digits_01() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw digits as float32 [N, 1, 8, 8] in [0, 1] and labels int64 [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))                          # [N]
    return x, y


def load_digits_source(image_size: int = 16) -> SourceData:
    """sklearn digits scaled to [-1, 1], upsampled (bilinear) to image_size x image_size."""
    x, y = _digits_01()
    x = _resize(x, image_size).clamp(0.0, 1.0) * 2.0 - 1.0  # [N, 1, S, S] in [-1, 1]
    return SourceData(images=x.contiguous(), labels=y, num_classes=10, name="digits")


# ----------------------------------------------------------------------------------------------------
# Image folder / glob over fsspec
# ----------------------------------------------------------------------------------------------------

def list_images(url: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(fs, sorted image paths) of a folder (searched recursively, walked one directory at a time, so listing a
    million files holds one directory's details at once, not all of them) or a glob URL. Both the in-memory
    loader and the streamed preparation list images through here."""
    fs, path = storage.filesystem(url)
    try:
        if any(ch in path for ch in "*?["):
            found = [str(p) for p in fs.glob(path)]
        elif fs.isdir(path):
            found = []
            for root, _, files in fs.walk(path, detail=False):
                found.extend(f"{root.rstrip('/')}/{f}" for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        elif fs.exists(path):
            found = [path]
        else:
            found = []
    except Exception as exc:  # noqa: BLE001 - backends raise anything; map to one line
        raise DataError(storage.redact(f"{url}: cannot list images ({type(exc).__name__}: {exc})")) from None
    return fs, sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS))


def load_image_folder(url: str, image_size: int = 16) -> SourceData:
    """Every image under `url` (a folder, searched recursively, or a glob), resized to image_size.

    Labels: the sorted names of the images' parent folders become class ids 0..C-1 (`root/cat/1.png`,
    `root/dog/2.png` -> cat=0, dog=1); when all images sit in one folder (flat), every label is 0.
    Colour: grayscale (1 channel) if every image is grayscale, else everything is converted to RGB.
    Each image is centre-cropped to a square, then resized (bicubic, antialiased by PIL).
    """
    from PIL import Image, UnidentifiedImageError

    fs, files = list_images(url)
    if not files:
        raise DataError(f"{url}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                        "check data.path")
    images = []
    for f in files:
        try:
            raw = fs.cat_file(f)
        except Exception as exc:  # noqa: BLE001 - backends raise anything; map to one line
            raise DataError(storage.redact(f"{f}: cannot read ({type(exc).__name__}: {exc})")) from None
        try:
            img = Image.open(io.BytesIO(raw))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            msg = f"{f}: not a readable image ({type(exc).__name__}); remove it from {url}"
            raise DataError(msg) from None
        images.append(img)

    gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    mode = "L" if gray else "RGB"
    arrays = []
    for im in images:
        im = im.convert(mode)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 255.0  # [S, S] or [S, S, 3] in [0, 1]
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays)) * 2.0 - 1.0  # [N, C, S, S] in [-1, 1]

    parents = [PurePosixPath(f).parent.as_posix() for f in files]
    classes = sorted(set(parents))
    if len(classes) <= 1:
        y = torch.zeros(len(files), dtype=torch.int64)
        num_classes = 1
    else:
        ids = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([ids[p] for p in parents], dtype=torch.int64)
        num_classes = len(classes)
    log.info("image folder %s: %d images, %d classes, %s", url, len(files), num_classes, mode)
    return SourceData(images=x.clamp(-1.0, 1.0).contiguous(), labels=y, num_classes=num_classes,
                      name=f"image_folder:{storage.redact(url)}")


# ----------------------------------------------------------------------------------------------------
# Moving digits (procedural video)
# ----------------------------------------------------------------------------------------------------

def load_moving_digits(num_videos: int = 512, frames: int = 16, size: int = 32, seed: int = 0,
                       sprite_size: int | None = None) -> SourceData:
    """Clips of one digit sprite bouncing off the walls of a size x size canvas; label = the digit class.

    Fully determined by `seed`: the digit picked for each clip, its start position and its velocity.
    Positions are integers (sprites stay crisp); each velocity component is 1-3 px/frame with a random
    sign, so every sprite moves every frame. Returns images [N, 1, frames, size, size] in [-1, 1].
    """
    sprite_size = sprite_size or size // 2
    if not 8 <= sprite_size < size:
        raise DataError(f"moving digits: sprite_size={sprite_size} must be in [8, video_size={size})")
    digits, targets = _digits_01()
    sprites = _resize(digits, sprite_size).clamp(0.0, 1.0)[:, 0].numpy()  # [D, s, s] in [0, 1]

    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sprites), size=num_videos)
    span = size - sprite_size  # positions live in [0, span]
    pos = rng.integers(0, span + 1, size=(num_videos, 2))
    vel = rng.integers(1, 4, size=(num_videos, 2)) * rng.choice([-1, 1], size=(num_videos, 2))

    video = np.zeros((num_videos, frames, size, size), dtype=np.float32)
    for n in range(num_videos):
        (r, c), (vr, vc) = pos[n], vel[n]
        sprite = sprites[pick[n]]
        for f in range(frames):
            video[n, f, r:r + sprite_size, c:c + sprite_size] = sprite
            r, vr = _bounce(r + vr, vr, span)
            c, vc = _bounce(c + vc, vc, span)
    x = torch.from_numpy(video).unsqueeze(1) * 2.0 - 1.0  # [N, 1, F, S, S] in [-1, 1]
    y = targets[torch.from_numpy(pick)]
    return SourceData(images=x.contiguous(), labels=y, num_classes=10, name="moving_digits")


def _bounce(p: int, v: int, span: int) -> tuple[int, int]:
    """Reflect a 1-D position that left [0, span] back inside it, flipping the velocity."""
    if p < 0:
        return -p, -v
    if p > span:
        return 2 * span - p, -v
    return p, v


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------

def load_source(cfg: DataConfig) -> SourceData:
    """The source named by `cfg.source`, built from the other `data.*` fields."""
    if cfg.source == "digits":
        return load_digits_source(cfg.image_size)
    if cfg.source == "image_folder":
        if not cfg.path:
            raise DataError("data.path is required when data.source=image_folder (a folder or glob URL)")
        try:
            return load_image_folder(cfg.path, cfg.image_size)
        except StorageError as exc:
            raise DataError(str(exc)) from None
    if cfg.source == "moving_digits":
        return load_moving_digits(cfg.num_videos, cfg.video_frames, cfg.video_size, cfg.seed)
    raise DataError(f"data.source={cfg.source!r}: unknown source (digits | image_folder | moving_digits)")
