"""expert.precision and expert.compile: bf16 trains and tracks fp32 in every kind of strategy (single,
FSDP2, DeepSpeed) with fp32 master weights; a GPU without bf16 is one line; compiled and eager models
agree (DiT, video DiT, and a parallel sampling mode)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from train_support import losses, tiny_cfg

from archipelago.errors import ConfigError
from archipelago.experts.callbacks import TrainCallback
from archipelago.experts.checkpoint import read_meta
from archipelago.experts.train import train_expert

STEPS = 16


class LinearDtypes(TrainCallback):
    """Records the dtype of every Linear output during training: what the matmuls really ran in."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def on_start(self, info):
        for m in info["model"].modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda mod, args, out: self.dtypes.add(out.dtype))


def _train(tmp_path, tiny_data, name: str, **expert) -> list[float]:
    probe = LinearDtypes()
    result = train_expert(tiny_cfg(steps=STEPS, **expert), 0, tiny_data, str(tmp_path / name), callbacks=[probe])
    bf16 = expert.get("precision") == "bf16"
    assert probe.dtypes == {torch.bfloat16 if bf16 else torch.float32}
    meta = read_meta(result["final_checkpoint"])
    assert meta["expert"]["precision"] == expert.get("precision", "fp32")
    assert meta["expert"]["compile"] is expert.get("compile", False)
    for f in ("model.safetensors", "ema.safetensors"):    # master weights and EMA stay fp32
        assert {v.dtype for v in load_file(str(tmp_path / name / "final" / f)).values()} == {torch.float32}
    return losses(tmp_path / name)


def _close(a: list[float], b: list[float]) -> None:
    """bf16 follows fp32: per step within 0.05, on average within 0.02."""
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    assert abs(sum(a) - sum(b)) / STEPS < 0.02, (a, b)


def test_bf16_tracks_fp32_single_fsdp2_and_deepspeed(tiny_data, tmp_path):
    fp32 = _train(tmp_path, tiny_data, "fp32")
    assert sum(fp32[-4:]) < sum(fp32[:4])                           # it learns at all
    _close(_train(tmp_path, tiny_data, "bf16", precision="bf16"), fp32)
    # DeepSpeed's engine switches an outer autocast off unless its torch_autocast section is on (the probe
    # sees fp32 matmuls then). One DeepSpeed run per process: it keeps the first process group globally.
    _close(_train(tmp_path, tiny_data, "ds-bf16", strategy="deepspeed", zero_stage=2, precision="bf16"), fp32)
    # FSDP2 (MixedPrecisionPolicy: bf16 all-gather, fp32 reduce) inside an existing group, as under Ray Train
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _close(_train(tmp_path, tiny_data, "fsdp2-bf16", strategy="fsdp2", precision="bf16"), fp32)
    finally:
        dist.destroy_process_group()


def test_deepspeed_carries_bf16_in_its_torch_autocast_section():
    """On CUDA DeepSpeed's engine turns an outer autocast off inside forward unless `torch_autocast` is on (on
    CPU it only looks at CUDA autocast, so the training test above cannot see this): the config must say so."""
    from archipelago.experts.parallelize import deepspeed_config

    bf16 = deepspeed_config(tiny_cfg(precision="bf16").expert, 1)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not bf16["bf16"]["enabled"]
    assert deepspeed_config(tiny_cfg().expert, 1)["torch_autocast"]["enabled"] is False


def test_switches_come_from_set_and_reach_mlflow_params():
    from archipelago.config import load_config
    from archipelago.orchestration.tracking import flatten

    cfg = load_config(None, ["expert.precision=bf16", "expert.compile=true"])
    assert (cfg.expert.precision, cfg.expert.compile) == ("bf16", True)
    params = flatten(cfg.model_dump(mode="json"))        # what the parent MLflow run logs
    assert params["expert.precision"] == "bf16" and params["expert.compile"] == "true"
    defaults = load_config(None, [])
    assert (defaults.expert.precision, defaults.expert.compile) == ("fp32", False)   # laptop-safe
    with pytest.raises(ConfigError, match=r"expert\.precision") as exc:
        load_config(None, ["expert.precision=fp16"])
    assert "\n" not in str(exc.value)


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    from archipelago.experts import precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match=r"^field 'expert\.precision': bf16 but cuda:0 \(Tesla V100\) has no "
                                          r"bf16 support; use expert\.precision=fp32$"):
        precision.check_precision("bf16", "cuda:0")
    precision.check_precision("fp32", "cuda:0")                     # fp32 needs nothing
    precision.check_precision("bf16", "cpu")                        # CPU autocast always has bf16


def test_compile_without_a_c_compiler_on_cpu_is_one_line(monkeypatch):
    from archipelago.experts import precision

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^field 'expert\.compile': true needs a C compiler"):
        precision.compile_module(torch.nn.Linear(2, 2))


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight: adaLN-Zero init would make both outputs exactly zero (a vacuous match)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_compiled_dit_and_video_dit_match_eager():
    from archipelago.experts.dit import DiT
    from archipelago.experts.precision import compile_module
    from archipelago.experts.video_dit import VideoDiT

    g = torch.Generator().manual_seed(1)
    dims = {"in_channels": 1, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 4, "num_classes": 10}
    cases = [(DiT(input_size=8, **dims), torch.randn(2, 1, 8, 8, generator=g)),
             (VideoDiT(input_size=8, **dims), torch.randn(2, 1, 3, 8, 8, generator=g))]
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 10])           # 10: the CFG null class
    for model, x in cases:
        model = _randomized(model)
        with torch.no_grad():
            eager = model(x, t, y)
            keys = list(model.state_dict())
            compiled = compile_module(model)(x, t, y)
        assert list(model.state_dict()) == keys                    # checkpoints stay interchangeable
        assert eager.abs().mean() > 0.1
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_compiled_cfg_parallel_matches_eager_single_device(tmp_path):
    """`generate --set expert.compile=true` with --parallel: each rank compiles its expert; the samples match
    the eager single-device run."""
    from archipelago.experts.checkpoint import save_for_inference
    from archipelago.experts.dit import DiT
    from archipelago.inference.config import ParallelConfig
    from archipelago.inference.local import launch_local
    from archipelago.inference.runner import SamplingSpec, run_parallel_sampling

    model = _randomized(DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                            num_classes=10))
    url = save_for_inference(model, str(tmp_path / "final"))
    spec = SamplingSpec(experts=[url], num_samples=2, steps=3, device="cpu", seed=3, cfg_scale=2.0)
    ref = run_parallel_sampling(spec, ParallelConfig()).samples
    results = launch_local(spec.model_copy(update={"compile": True}),
                           ParallelConfig(mode="cfg_parallel", world_size=2), timeout_s=1100)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(results[0].samples, ref, rtol=1e-3, atol=1e-3)
