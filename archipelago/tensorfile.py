"""safetensors bytes that are the same for the same tensors and metadata, in every process.

safetensors keeps `__metadata__` in a Rust HashMap whose iteration order is seeded per process, so two
processes saving the same tensors with two or more metadata keys write different bytes (a different
sha256 for the same checkpoint; `archipelago serve` and `archipelago generate` disagreeing on the same
samples). `save_bytes` re-writes the header with the metadata keys sorted; the tensor data is untouched.
"""

from __future__ import annotations

import json

import torch

HEADER_ALIGN = 8   # safetensors pads its JSON header with spaces to this many bytes


def save_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors.torch.save(tensors, metadata) with a deterministic header."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return raw
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]
