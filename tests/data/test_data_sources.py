"""Sources: digits, moving digits (seeded video), and an image folder written by the test."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from archipelago.config import DataConfig
from archipelago.data import load_digits_source, load_image_folder, load_moving_digits, load_source
from archipelago.errors import DataError


def test_digits_shape_range_labels(digits):
    assert digits.images.shape == (1797, 1, 16, 16)
    assert digits.images.dtype == torch.float32 and digits.labels.dtype == torch.int64
    assert digits.images.min() >= -1.0 and digits.images.max() <= 1.0
    # Real strokes reach full intensity and the background is at -1.
    assert digits.images.max() > 0.9 and digits.images.min() == -1.0
    assert digits.num_classes == 10 and sorted(digits.labels.unique().tolist()) == list(range(10))


def test_digits_native_size_is_exact_rescale():
    from sklearn.datasets import load_digits

    x = load_digits_source(8).images
    ref = torch.from_numpy(load_digits().images / 16.0 * 2 - 1).float()
    assert torch.allclose(x[:, 0], ref)


def test_moving_digits_shape_range_and_motion():
    v = load_moving_digits(num_videos=12, frames=16, size=32, seed=3)
    assert v.images.shape == (12, 1, 16, 32, 32)
    assert v.images.min() >= -1.0 and v.images.max() <= 1.0
    assert v.labels.shape == (12,) and v.labels.dtype == torch.int64 and v.num_classes == 10
    # Every clip changes between every pair of consecutive frames.
    per_pair = (v.images[:, 0, 1:] - v.images[:, 0, :-1]).abs().amax(dim=(-1, -2))  # [N, F-1]
    assert (per_pair > 0.1).all()
    # The sprite's centre of mass actually travels (not just flicker).
    w = (v.images[:, 0] + 1) / 2                                                      # [N, F, H, W]
    cols = torch.arange(32.0)
    cx = (w.sum(-2) * cols).sum(-1) / w.sum((-1, -2))                                # [N, F]
    assert ((cx[:, 1:] - cx[:, :-1]).abs() > 0.5).float().mean() > 0.5


def test_moving_digits_reproducible_by_seed():
    a = load_moving_digits(num_videos=8, frames=16, seed=7)
    b = load_moving_digits(num_videos=8, frames=16, seed=7)
    c = load_moving_digits(num_videos=8, frames=16, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def _top_left_aligned(img: torch.Tensor, side: int = 16) -> torch.Tensor:
    """Crop [H, W] to side x side starting at the top-left of its ink, zero-padded."""
    ys, xs = torch.nonzero(img > 1e-3, as_tuple=True)
    region = img[int(ys.min()):int(ys.min()) + side, int(xs.min()):int(xs.min()) + side]
    out = torch.zeros(side, side)
    out[:region.shape[0], :region.shape[1]] = region
    return out


def test_moving_digits_label_is_the_sprite_class():
    """Frame 0 of each clip contains, pixel for pixel, a digit sprite of the clip's label."""
    from sklearn.datasets import load_digits

    d = load_digits()
    v = load_moving_digits(num_videos=10, frames=2, size=32, seed=0)
    raw = torch.from_numpy(d.images / 16.0).float()[:, None]                          # [D, 1, 8, 8]
    sprites = torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False,
                                              antialias=True)[:, 0]
    sprites = torch.stack([_top_left_aligned(s.clamp(0, 1)) for s in sprites])      # [D, 16, 16]
    for n in range(10):
        crop = _top_left_aligned((v.images[n, 0, 0] + 1) / 2)                        # [16, 16]
        dist = (sprites - crop).abs().amax(dim=(-1, -2))                              # [D]
        best = int(dist.argmin())
        assert float(dist[best]) < 1e-4 and int(d.target[best]) == int(v.labels[n])


def _png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (20, 30), dtype=np.uint8), "L")
    # One RGB image: everything becomes RGB so channels are consistent.
    _png(tmp_path / "dog" / "rgb.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_image_folder(str(tmp_path), image_size=16)
    assert s.images.shape == (6, 3, 16, 16)
    assert s.images.min() >= -1 and s.images.max() <= 1
    assert s.num_classes == 2
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1]  # cat=0, dog=1 (sorted folder names)


def test_image_folder_flat_gray_and_glob(tmp_path):
    white = np.full((10, 10), 255, dtype=np.uint8)
    black = np.zeros((10, 10), dtype=np.uint8)
    _png(tmp_path / "a.png", white, "L")
    _png(tmp_path / "b.png", black, "L")
    _png(tmp_path / "c.jpg", white, "L")
    s = load_image_folder(str(tmp_path), image_size=8)
    assert s.images.shape == (3, 1, 8, 8) and s.num_classes == 1 and s.labels.tolist() == [0, 0, 0]
    assert torch.allclose(s.images[0], torch.ones(1, 8, 8))
    assert torch.allclose(s.images[1], -torch.ones(1, 8, 8))
    g = load_image_folder(f"file://{tmp_path}/*.png", image_size=8)
    assert g.images.shape == (2, 1, 8, 8)


def test_image_folder_over_memory_url():
    import io

    import fsspec

    fs = fsspec.filesystem("memory")
    for cls in ("x", "y"):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(buf, format="PNG")
        fs.pipe(f"/imgs-src-test/{cls}/0.png", buf.getvalue())
    s = load_source(DataConfig(source="image_folder", path="memory://imgs-src-test", image_size=8))
    assert s.images.shape == (2, 1, 8, 8) and s.labels.tolist() == [0, 1]
    fs.rm("/imgs-src-test", recursive=True)


def test_image_folder_empty_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    url = str(tmp_path / "empty")
    with pytest.raises(DataError) as exc:
        load_image_folder(url)
    msg = str(exc.value)
    assert url in msg and "no images" in msg and "\n" not in msg


def test_image_folder_corrupt_image_names_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png"):
        load_image_folder(str(tmp_path))


def test_image_folder_requires_path():
    with pytest.raises(DataError, match="data.path"):
        load_source(DataConfig(source="image_folder"))
