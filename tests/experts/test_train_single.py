"""The island training loop in-process: it learns, its checkpoints round-trip exactly, broken checkpoints
are refused with one line, and DDP/FSDP2 inside an existing process group (the Ray Train path) reproduce
the single-process numbers."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from train_support import losses, read_metrics, tiny_cfg

from archipelago import storage
from archipelago.errors import CheckpointError, ConfigError
from archipelago.experts.callbacks import TrainCallback
from archipelago.experts.checkpoint import CheckpointManager, load_expert, read_meta
from archipelago.experts.train import ShardSampler, lr_at, train_expert


class Capture(TrainCallback):
    """Keeps what the loop hands to callbacks (the live model and EMA) and every hook call."""

    def __init__(self):
        self.info: dict = {}
        self.steps: list[int] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.result: dict = {}

    def on_start(self, info):
        self.info = info

    def on_step(self, step, metrics):
        self.steps.append(step)

    def on_checkpoint(self, step, url):
        self.checkpoints.append((step, url))

    def on_end(self, result):
        self.result = result


def probe(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g), torch.tensor([0, 3, 9, 10])


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One 30-step single-process run (shared, read-only: tests that corrupt it copy it first)."""
    out = tmp_path_factory.mktemp("single") / "expert-000"
    cap = Capture()
    result = train_expert(tiny_cfg(steps=30), 0, tiny_data, str(out), callbacks=[cap])
    return out, cap, result


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------
# training + checkpoint round trip
# ----------------------------------------------------------------------------------------------------

def test_single_loss_decreases_and_hooks_fire(trained):
    out, cap, result = trained
    ls = losses(out)
    assert len(ls) == 30 and cap.steps == list(range(1, 31))
    first, last = sum(ls[:5]) / 5, sum(ls[-5:]) / 5
    assert last < first - 0.1, f"loss did not decrease: first {first:.3f}, last {last:.3f}"
    assert result["final_checkpoint"] == storage.join(str(out), "final") and result["steps"] == 30
    assert result["final_loss"] == pytest.approx(ls[-1]) and result["samples_per_s"] > 0
    assert cap.result == result and [s for s, _ in cap.checkpoints] == [1, 10, 20, 30]
    m = read_metrics(out)[0]
    assert set(m) >= {"step", "loss", "lr", "grad_norm", "samples_per_s", "step_time_s"}


def test_checkpoint_layout_meta_and_purge(trained, tiny_data):
    out, _, _ = trained
    # keep=2 periodic checkpoints: step 1 (the fail-fast save) was purged; the final step stays.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000020", "step-00000030"]
    meta = read_meta(str(out / "final"))
    assert meta["final"] is True and meta["step"] == 30 and meta["strategy"] == "single"
    assert meta["world_size"] == 1 and meta["shard"] == 0 and meta["model"]["class"] == "DiT"
    assert meta["config_hash"] == tiny_cfg(steps=30).config_hash()
    assert meta["shard_sha256"] and meta["data_manifest_sha256"]
    assert set(meta["files"]) == {"model.safetensors", "ema.safetensors", "rng.safetensors",
                                  "optimizer/optimizer.safetensors", "optimizer/optimizer.json"}
    for name, digest in meta["files"].items():
        assert storage.sha256_bytes((out / "final" / name).read_bytes()) == digest
    assert CheckpointManager(str(out)).latest() == storage.join(str(out), "checkpoints", "step-00000030")


def test_load_expert_equals_trained_models_exactly(trained):
    out, cap, _ = trained
    x, t, y = probe()
    ema_live = cap.info["ema"].shadow.eval()
    model_live = cap.info["model"].eval()
    ema_loaded, meta = load_expert(str(out / "final"))
    raw_loaded, _ = load_expert(str(out / "final"), ema=False)
    with torch.no_grad():
        assert torch.equal(ema_loaded(x, t, y), ema_live(x, t, y))
        assert torch.equal(raw_loaded(x, t, y), model_live(x, t, y))
        # EMA (decay 0.9) and raw weights are different models: the test above could tell them apart.
        assert not torch.equal(ema_loaded(x, t, y), raw_loaded(x, t, y))
    assert not ema_loaded.training and meta["step"] == 30


def test_finished_run_is_reused(trained, tiny_data):
    out, _, result = trained
    before = (out / "final" / "meta.json").read_bytes()
    again = train_expert(tiny_cfg(steps=30), 0, tiny_data, str(out))
    assert again["cached"] is True and again["final_checkpoint"] == result["final_checkpoint"]
    assert (out / "final" / "meta.json").read_bytes() == before


# ----------------------------------------------------------------------------------------------------
# broken checkpoints
# ----------------------------------------------------------------------------------------------------

def test_latest_ignores_missing_meta_and_bad_hashes(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    ckpts = run / "checkpoints"
    # A newer directory that a killed writer left without meta.json, and the final's meta removed.
    shutil.copytree(ckpts / "step-00000020", ckpts / "step-00000099")
    (ckpts / "step-00000099" / "meta.json").unlink()
    (ckpts / "step-00000030" / "meta.json").unlink()
    mgr = CheckpointManager(str(run))
    assert mgr.latest() == storage.join(str(run), "checkpoints", "step-00000020")
    # A file that no longer matches its hash disqualifies that checkpoint too.
    (ckpts / "step-00000020" / "rng.safetensors").write_bytes(b"garbage")
    assert mgr.latest() == storage.join(str(run), "checkpoints", "step-00000010")


def rehash(ckpt: Path, name: str) -> None:
    """Record the current sha256 of `name` in the checkpoint's meta.json, as a forger would."""
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"][name] = storage.sha256_bytes((ckpt / name).read_bytes())
    meta_path.write_text(json.dumps(meta))


def test_truncated_safetensors_raises_one_line(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    ema = run / "final" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: sha256 mismatch") as e:
        load_expert(str(run / "final"))
    assert "\n" not in str(e.value)
    # Even with a matching hash (e.g. meta rewritten), the parser refuses the truncated file.
    rehash(run / "final", "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: not a valid safetensors file"):
        load_expert(str(run / "final"))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickle_in_place_of_weights_is_refused_without_running_it(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    ema = run / "final" / "ema.safetensors"
    torch.save({"w": _Payload()}, ema)
    rehash(run / "final", "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: not a valid safetensors file"):
        load_expert(str(run / "final"))
    assert not marker.exists()


def test_missing_meta_and_wrong_architecture(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    meta_path = run / "final" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["args"]["depth"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: weights do not fit the model architecture"):
        load_expert(str(run / "final"))
    meta_path.unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json: missing"):
        load_expert(str(run / "final"))


def test_resume_into_another_architecture_is_refused(trained, tiny_data, tmp_path):
    run = copy_run(trained[0], tmp_path)
    shutil.rmtree(run / "final")  # not finished: train_expert must resume from checkpoints/
    with pytest.raises(CheckpointError, match=r"architecture differs.*hidden_size"):
        train_expert(tiny_cfg(steps=40, hidden_size=64), 0, tiny_data, str(run))


def test_ddp_in_process_without_a_group_gets_a_one_rank_group(tiny_data, tmp_path):
    result = train_expert(tiny_cfg(steps=2, strategy="ddp"), 0, tiny_data, str(tmp_path / "run"))
    assert result["world_size"] == 1 and read_meta(result["final_checkpoint"])["strategy"] == "ddp"
    assert not dist.is_initialized(), "the group train_expert created must be destroyed"


def test_single_with_several_ranks_and_bad_batch_split_are_config_errors(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"expert\.batch_size"):
        train_expert(tiny_cfg(batch_size=30, grad_accum=4), 0, tiny_data, str(tmp_path / "x"))


# ----------------------------------------------------------------------------------------------------
# schedule, sampler, stores, precision, and the "process group already exists" path
# ----------------------------------------------------------------------------------------------------

def test_lr_warmup_then_cosine_to_min():
    cfg = tiny_cfg(steps=100, warmup_steps=10, lr=1e-3, lr_min_ratio=0.1).expert
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and lr_at(100, cfg) == pytest.approx(1e-4)


def test_sampler_ranks_disjoint_and_cover_each_epoch():
    n, world, micro = 103, 2, 10
    samplers = [ShardSampler(n, world, r, seed=3) for r in range(world)]
    per_rank = n // world                                   # 51: the tail sample is dropped, as in DDP
    epoch = [torch.cat([s.indices(i, micro) for i in range(per_rank // micro)]) for s in samplers]
    assert set(epoch[0].tolist()).isdisjoint(epoch[1].tolist())
    # Micro-batches cross epoch boundaries and are a pure function of the index (resumable).
    again = ShardSampler(n, world, 0, seed=3)
    assert torch.equal(again.indices(7, micro), samplers[0].indices(7, micro))
    assert len(samplers[0].indices(5, micro)) == micro


def test_video_shards_train_a_video_expert(tmp_path):
    from archipelago.config import ArchipelagoConfig
    from archipelago.data.prepare import prepare_data

    cfg = ArchipelagoConfig.model_validate({
        "data": {"source": "moving_digits", "num_videos": 8, "video_frames": 4, "video_size": 16, "num_clusters": 1},
        "expert": {"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "steps": 3, "batch_size": 4,
                   "warmup_steps": 1}})
    prepare_data(cfg.data, str(tmp_path / "data"), progress=False)
    result = train_expert(cfg, 0, str(tmp_path / "data"), str(tmp_path / "run"))
    model, meta = load_expert(result["final_checkpoint"])
    assert type(model).__name__ == "VideoDiT" and meta["image_shape"] == [1, 4, 16, 16]
    assert model(torch.zeros(2, 1, 4, 16, 16), torch.rand(2), torch.tensor([0, 10])).shape == (2, 1, 4, 16, 16)


def test_no_resume_starts_over(trained, tiny_data, tmp_path):
    run = copy_run(trained[0], tmp_path)
    result = train_expert(tiny_cfg(steps=4, checkpoint_every=2), 0, tiny_data, str(run), resume=False)
    assert result["start_step"] == 0 and result["steps"] == 4
    # The old run's steps 10..30 are gone (a later resume must not pick them up).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002", "step-00000004"]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


def test_memory_store_and_bf16(tiny_data):
    url = "memory://archipelago-test/expert-000"
    result = train_expert(tiny_cfg(steps=3, precision="bf16"), 0, tiny_data, url)
    model, meta = load_expert(result["final_checkpoint"])
    assert meta["step"] == 3 and meta["expert"]["precision"] == "bf16"
    x, t, y = probe()
    assert torch.isfinite(model(x, t, y)).all()
    assert len(storage.read_text(storage.join(url, "metrics.jsonl")).splitlines()) == 3
    storage.remove(url, recursive=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_existing_process_group_reproduces_single(strategy, tiny_data, tmp_path):
    """As under Ray Train: the group exists before train_expert; at world size 1 the numbers must equal
    the single-process run from the same seed (same data order, noise, init)."""
    cfg_single, cfg_dist = tiny_cfg(steps=6, grad_accum=2), tiny_cfg(steps=6, grad_accum=2, strategy=strategy)
    single = train_expert(cfg_single, 0, tiny_data, str(tmp_path / "single"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        result = train_expert(cfg_dist, 0, tiny_data, str(tmp_path / strategy))
        assert dist.is_initialized(), "train_expert must not destroy a group it did not create"
    finally:
        dist.destroy_process_group()
    assert result["strategy"] == strategy
    assert losses(tmp_path / strategy) == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / strategy / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert single["final_checkpoint"]


def test_sharded_optimizer_files_that_would_run_code_are_refused(tmp_path):
    """FSDP2's DCP `.metadata` and DeepSpeed's `.pt` files are pickles; ours are read with allowlists."""
    import pickle

    from archipelago.experts.checkpoint import SafeFileSystemReader, check_weights_only

    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    dcp_dir = tmp_path / "dcp"
    dcp_dir.mkdir()
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load"):
        SafeFileSystemReader(str(dcp_dir)).read_metadata()
    torch.save({"optimizer": _Payload()}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"optim_states\.pt: refused to load"):
        check_weights_only(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not marker.exists()


def test_rich_progress_callback_runs(tiny_data, tmp_path):
    from archipelago.experts.callbacks import RichProgressCallback

    bar = RichProgressCallback("expert 0")
    train_expert(tiny_cfg(steps=2), 0, tiny_data, str(tmp_path / "run"), callbacks=[bar])
    assert bar._progress is None  # started on rank 0 and stopped at the end
