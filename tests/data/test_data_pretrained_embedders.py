"""CLIP and SigLIP embedders with tiny random transformers models saved like real checkpoints (local weights
only): batched features of unit norm, used by `data prepare` in memory and streamed; bad setups are one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from archipelago.config import DataConfig
from archipelago.data import get_embedder, load_digits_source, prepare_data
from archipelago.errors import DataError


def save_tiny_vision(kind: str, path: Path) -> Path:
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    if kind == "clip":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=16, **common))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**common))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.mark.parametrize("kind,dim", [("clip", 16), ("siglip", 32)])
def test_vision_embedder_batches_and_normalises(kind, dim, tmp_path):
    weights = save_tiny_vision(kind, tmp_path / kind)
    emb = get_embedder(kind, DataConfig(embedder=kind, embedder_weights=str(weights), embed_batch_size=7))
    x = load_digits_source(16).images[:20]                    # grayscale 16x16 -> RGB 32x32 inside
    f = emb.embed(x)                                          # 3 batches, progress bar on
    assert f.shape == (20, dim) and f.dtype == np.float32
    assert np.allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    emb.batch_size = 20
    assert np.allclose(emb.embed(x), f, atol=1e-5)             # batching does not change features


def test_prepare_with_clip_in_memory_and_siglip_streamed(tmp_path):
    clip = save_tiny_vision("clip", tmp_path / "clip")
    m = prepare_data(DataConfig(num_clusters=3, embedder="clip", embedder_weights=str(clip)),
                     str(tmp_path / "a"), progress=False)
    assert m.embedder == "clip" and len(m.centroids[0]) == 16 and sum(m.counts) + m.holdout.count == 1797

    from tests.data.test_data_scale import write_folder

    write_folder(str(tmp_path / "img"), per_class=10)
    siglip = save_tiny_vision("siglip", tmp_path / "siglip")
    m = prepare_data(DataConfig(source="image_folder", path=str(tmp_path / "img"), image_size=8, num_clusters=2,
                                shard_format="chunked", embedder="siglip", embedder_weights=str(siglip),
                                prepare_batch=8), str(tmp_path / "b"), progress=False)
    assert m.embedder == "siglip" and len(m.centroids[0]) == 32 and m.num_samples + m.holdout.count == 30


def test_vision_embedder_refuses_missing_or_remote_weights(tmp_path):
    with pytest.raises(DataError, match="clip embedder needs local weights.*nothing is downloaded"):
        get_embedder("clip", DataConfig(embedder="clip"))
    with pytest.raises(DataError, match="remote URL"):
        get_embedder("siglip", DataConfig(embedder="siglip", embedder_weights="s3://b/siglip"))
    with pytest.raises(DataError, match="has no config.json"):
        get_embedder("clip", DataConfig(embedder="clip", embedder_weights=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(DataError, match="not a loadable clip model"):
        get_embedder("clip", DataConfig(embedder="clip", embedder_weights=str(tmp_path))).embed(torch.zeros(1, 1, 8, 8))
