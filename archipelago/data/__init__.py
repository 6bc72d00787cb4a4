"""Data for decentralized diffusion: sources, embedders, the balanced k-means partitioner and the K-shard
format (safetensors shards + manifest.json) that islands and the router read. See docs/CONTRACTS.md."""
from archipelago.data.embedders import EMBEDDERS, Dinov2Embedder, Embedder, PixelPCAEmbedder, get_embedder
from archipelago.data.partition import (
    Partition,
    cluster_purity,
    kmeans_partition,
    partition,
    random_partition,
)
from archipelago.data.prepare import prepare_data
from archipelago.data.shards import (
    FORMAT_VERSION,
    ShardData,
    ShardInfo,
    ShardManifest,
    data_config_hash,
    load_manifest,
    manifest_sha256,
    read_all,
    read_shard,
    verify_shards,
)
from archipelago.data.sources import (
    SourceData,
    load_digits_source,
    load_image_folder,
    load_moving_digits,
    load_source,
)

__all__ = [
    "EMBEDDERS", "FORMAT_VERSION", "Dinov2Embedder", "Embedder", "Partition", "PixelPCAEmbedder", "ShardData",
    "ShardInfo", "ShardManifest", "SourceData", "cluster_purity", "data_config_hash", "get_embedder",
    "kmeans_partition", "load_digits_source", "load_image_folder", "load_manifest", "load_moving_digits",
    "load_source", "manifest_sha256", "partition", "prepare_data", "random_partition", "read_all",
    "read_shard", "verify_shards",
]
