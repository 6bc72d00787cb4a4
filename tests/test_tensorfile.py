"""Same tensors + metadata -> same safetensors bytes in every process (safetensors alone: not so)."""

import json
import subprocess
import sys
import tempfile

import torch

SCRIPT = """
import sys, torch
from archipelago.generate import samples_bytes
from archipelago.experts.checkpoint import encode_tensors
from archipelago.tensorfile import save_bytes
from safetensors.torch import save
t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
meta = {"z": "1", "archipelago": "x", "meta": "{}", "c": "2", "b": "3"}
out = [samples_bytes(t, torch.tensor([0, 1, 2]), {"seed": 7, "mode": "top-2"}),
       encode_tensors({"w": t, "b": t[0].clone()}, "expert"), save_bytes({"a": t, "b": t[:1].clone()}, meta),
       save({"a": t, "b": t[:1].clone()}, metadata=meta)]
sys.stdout.write("|".join(b.hex() for b in out))
"""


def test_bytes_are_the_same_in_every_process():
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
            .split("|") for _ in range(4)]
    for i in range(3):
        assert len({r[i] for r in runs}) == 1, f"output {i} differs between processes"
    # The control: safetensors' own header order varies between processes (5 keys: 120 orders), which is
    # why save_bytes exists. 4 runs all agreeing by chance is (1/120)^3.
    assert len({r[3] for r in runs}) > 1


def test_the_rewritten_header_reads_back():
    from safetensors import safe_open
    from safetensors.torch import load

    from archipelago.tensorfile import save_bytes

    t = {"a": torch.randn(5, 3), "lbl": torch.arange(4), "h": torch.ones(7, dtype=torch.float16)}
    meta = {"é": "ü", "b": "2", "a": "1"}        # non-ASCII keys survive the rewrite
    blob = save_bytes(t, meta)
    n = int.from_bytes(blob[:8], "little")
    assert (8 + n) % 8 == 0
    back = load(blob)
    assert all(torch.equal(back[k], v) for k, v in t.items())
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        with safe_open(f.name, "pt") as h:
            assert h.metadata() == meta
    assert list(json.loads(blob[8:8 + n])["__metadata__"]) == ["a", "b", "é"]
