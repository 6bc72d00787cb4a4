"""Bad input through the real CLI: every case runs `archipelago ...` (or the torchrun entry point) as a
subprocess and must fail with exit code 2, exactly one non-empty stderr line that names the culprit, no
traceback, no credential in the output, and no partial output (nothing it would have written exists, and
inputs it must not touch are byte-identical afterwards).

| area | id | bad input | expected one line (substrings) |
|---|---|---|---|
| config | config-unknown-field | `expert.depht: 3` in the YAML file | `<file>: unknown field 'expert.depht' (known: ...)` |
| config | config-wrong-type | `expert.lr: fast` in the YAML file | `<file>: field 'expert.lr': Input should be a valid number ... (got 'fast')` |
| config | config-k-larger-than-data | image folder of 3 images, `data.num_clusters=5` | `data.num_clusters=5 is larger than the number of training samples (3) ...` |
| config | config-zero-workers | `archipelago train --set islands.num_workers=0` | `<file> + --set: field 'islands.num_workers': ... greater than or equal to 1 (got 0)` |
| config | config-unknown-strategy | `--set expert.strategy=horovod` | `field 'expert.strategy' ... (got 'horovod'); allowed: single \\| ddp \\| fsdp2 \\| deepspeed` |
| config | config-negative-steps | `--set expert.steps=-5` | `field 'expert.steps': ... greater than or equal to 1 (got -5)` |
| config | config-path-with-brackets | unknown field in `.../[exp1]/bad.yaml` | the path printed verbatim, `[exp1]` included (was eaten as rich markup) |
| data | data-missing-shard | `shard-001.safetensors` deleted | `<data>/shard-001.safetensors: shard 1 is missing; re-run ...data prepare` |
| data | data-truncated-shard | shard 0 cut in half (manifest sha256 updated, so the parser sees it) | `<data>/shard-000.safetensors: not a valid safetensors shard (...truncated or corrupt)` |
| data | data-hash-mismatch | one byte of shard 0 flipped (same size) | `<data>/shard-000.safetensors: sha256 mismatch (manifest ..., file ...)` |
| data | data-format-version | manifest `format_version: 99` | `<data>/manifest.json: manifest format version 99, this Archipelago reads 1` |
| data | data-not-prepared | `--data` an empty directory | `<data>/manifest.json: no manifest ... run archipelago data prepare` |
| data | data-path-escape | shard 0's `file` is `../outside.safetensors` (a valid copy of the shard lies there) | `<data>/manifest.json: shard 0: file '../outside.safetensors' points outside the data directory ...` |
| data | data-path-absolute | shard 0's `file` is an absolute path | the same line naming the absolute path |
| data | data-path-scheme | shard 0's `file` is a `file://` URL | the same line naming the URL |
| data | data-empty-image-folder | `data.source=image_folder`, empty folder | `<folder>: no images found (looked for .png, ...); check data.path` |
| checkpoint | ckpt-truncated | `ema.safetensors` cut in half | `<ckpt>/ema.safetensors: sha256 mismatch with meta.json ...: truncated or modified` |
| checkpoint | ckpt-pickle | `ema.safetensors` replaced by a `torch.save` pickle whose unpickling would run code (sha256 updated) | `<ckpt>/ema.safetensors: not a valid safetensors file (... another format such as a pickle)`; the payload never ran |
| checkpoint | ckpt-wrong-architecture | `ema.safetensors` of a hidden-48 expert in a hidden-32 checkpoint (sha256 updated) | `<ckpt>/ema.safetensors: weights do not fit the model architecture (size mismatch ...)` |
| checkpoint | ckpt-resume-other-architecture | `train-expert --set expert.hidden_size=64` onto a run with hidden-32 checkpoints | `<run>/checkpoints/.../meta.json: architecture differs from the config (... fields hidden_size ...)`; run dir untouched |
| checkpoint | ckpt-missing-meta | `meta.json` deleted | `<ckpt>: neither an ensemble.json nor an expert checkpoint directory (no ... meta.json there)` |
| training | diverged-expert | `train-expert --set expert.lr=1e38` (Adam's step overflows at step 1) | `expert 0 (<out>): non-finite grad norm inf at step 1; stopped (expert.on_nonfinite=stop), no final checkpoint written; last good checkpoint: none; ...` |
| training | diverged-expert-nan | `train-expert --set expert.lr=1e30` (the loss is nan at step 2) | `... non-finite loss nan at step 2; ... last good checkpoint: <out>/checkpoints/step-00000001; ...`; no `final/` |
| training | diverged-router | `train-router --set router.lr=1e38` | `router (<out>): non-finite ... (router.on_nonfinite=stop), no final checkpoint written ...`; nothing written |
| ensemble | ensemble-expert-sizes | expert 1 is a hidden-48 expert | `expert 1 (<ckpt>/meta.json): hidden_size=48 differs from expert 0's 32; ...` |
| ensemble | ensemble-router-k | router trained on K=3 data | `router (<router>/meta.json): predicts K=3 clusters but the ensemble has 2 experts` |
| ensemble | ensemble-other-manifest | expert 1 trained on another data manifest | `expert 1 (<ckpt>/meta.json): trained on data manifest ..., the ensemble's is ... (other data)` |
| storage | storage-unreachable | `AWS_ENDPOINT_URL` = a closed port on 127.0.0.1 | `s3://...: cannot access the store: cannot reach the store; check AWS_ENDPOINT_URL ...` |
| storage | storage-wrong-credentials | real moto server with auth enforced (`INITIAL_NO_AUTH_ACTION_COUNT`), a valid key id with a wrong secret (SignatureDoesNotMatch) | `s3://...: permission denied while trying to access the store (Forbidden); check the credentials ...` |
| storage | storage-no-bucket | `s3://` bucket that does not exist (moto) | `s3://.../shard-000.safetensors: cannot write: bucket does not exist; create it or fix the URL` |
| cli | cli-bad-mode | `generate --ensemble ... --mode fastest` | `generate: --mode: unknown routing mode 'fastest'; allowed: full \\| top-1 \\| ...` (before any weights are read) |
| cli | cli-world-size | `python -m archipelago.inference --mode sync_patch` as rank 0 of 3 (torchrun's env) on an 8x8 / patch-2 expert | `<ckpt>: patch_degree=3 (...) must divide the 4 token rows ...; use a patch degree ... in [1, 2, 4]` (before the rendezvous) |
| cli | cli-debug | `--debug` with the unknown-field config | non-zero exit and a full traceback (the only case that expects one) |
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from robustness_support import REPO, Artifacts, copy_tree, run_module

SECRET = "robust-secret-Vq8mZ1xY"          # never printed
KEY_ID = "AKIAROBUSTNESS0001"              # never printed


@dataclass
class Run:
    """What one case runs and what must hold afterwards."""
    argv: list[str]
    module: str = "archipelago.cli"
    env: dict[str, str] = field(default_factory=dict)
    absent: list[Path] = field(default_factory=list)      # must not exist after the failure
    unchanged: list[Path] = field(default_factory=list)   # trees that must be byte-identical afterwards
    secrets: list[str] = field(default_factory=list)      # must not appear in stdout/stderr


@dataclass
class Case:
    id: str
    needles: tuple[str, ...]                               # substrings of the one stderr line
    build: Callable[[Artifacts, Path, dict], Run]
    traceback: bool = False                                # --debug: a traceback is expected instead


# ----------------------------------------------------------------------------------------------------
# Helpers that break things
# ----------------------------------------------------------------------------------------------------

def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _set_manifest(data: Path, **changes) -> None:
    m = json.loads((data / "manifest.json").read_text())
    m.update(changes)
    (data / "manifest.json").write_text(json.dumps(m))


def _rehash_shard(data: Path, k: int) -> None:
    m = json.loads((data / "manifest.json").read_text())
    m["shards"][k]["sha256"] = hashlib.sha256((data / m["shards"][k]["file"]).read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps(m))


def _rehash_ckpt(ckpt: Path, name: str) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _Payload:
    """Unpickling this creates a directory: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _config_file(ws: Path, text: str, name: str = "bad.yaml") -> Path:
    path = ws / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("L", (8, 8), color=30 * i).save(folder / f"img{i}.png")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_expert(a: Artifacts, ws: Path, *extra: str, shard: int = 0, data: Path | None = None) -> list[str]:
    return ["train-expert", "--shard", str(shard), "--config", str(a.config), "--data", str(data or a.data),
            "--out", str(ws / "out"), *extra]


def _generate(ws: Path, what: str, url: Path | str, *extra: str) -> list[str]:
    return ["generate", what, str(url), "--n", "4", "--steps", "2", "--out", str(ws / "grid.png"), *extra]


def _bad_ensemble(a: Artifacts, ws: Path, **changes) -> Path:
    spec = json.loads(a.ensemble.read_text())
    if "expert1" in changes:
        spec["experts"]["1"] = str(changes["expert1"])
    if "router" in changes:
        spec["router"] = str(changes["router"])
    path = ws / "ensemble.json"
    path.write_text(json.dumps(spec))
    return path


# ----------------------------------------------------------------------------------------------------
# The cases (the module docstring's table)
# ----------------------------------------------------------------------------------------------------

def _c_unknown_field(a, ws, ctx):
    cfg = _config_file(ws, "expert:\n  depht: 3\n")
    return Run(["data", "prepare", "--config", str(cfg), "--out", str(ws / "data")], absent=[ws / "data"])


def _c_wrong_type(a, ws, ctx):
    cfg = _config_file(ws, "expert:\n  lr: fast\n")
    return Run(["train-expert", "--shard", "0", "--config", str(cfg), "--data", str(a.data), "--out",
                str(ws / "out")], absent=[ws / "out"])


def _c_k_too_large(a, ws, ctx):
    imgs = _images(ws / "imgs", 3)
    return Run(["data", "prepare", "--config", str(a.config), "--out", str(ws / "data"), "--set",
                "data.source=image_folder", "--set", f"data.path={imgs}", "--set", "data.num_clusters=5"],
               absent=[ws / "data"])


def _c_zero_workers(a, ws, ctx):
    return Run(["train", "--config", str(a.config), "--set", "islands.num_workers=0", "--set",
                f"storage.root={ws / 'root'}"], absent=[ws / "root"])


def _c_unknown_strategy(a, ws, ctx):
    return Run(_train_expert(a, ws, "--set", "expert.strategy=horovod"), absent=[ws / "out"])


def _c_negative_steps(a, ws, ctx):
    return Run(_train_expert(a, ws, "--set", "expert.steps=-5"), absent=[ws / "out"])


def _c_brackets(a, ws, ctx):
    cfg = _config_file(ws, "expert:\n  depht: 3\n", name="[exp1]/bad.yaml")
    return Run(["data", "prepare", "--config", str(cfg), "--out", str(ws / "data")], absent=[ws / "data"])


def _d_missing_shard(a, ws, ctx):
    data = copy_tree(a.data, ws / "data")
    (data / "shard-001.safetensors").unlink()
    return Run(_train_expert(a, ws, shard=1, data=data), absent=[ws / "out"], unchanged=[data])


def _d_truncated(a, ws, ctx):
    data = copy_tree(a.data, ws / "data")
    _truncate(data / "shard-000.safetensors")
    _rehash_shard(data, 0)
    return Run(_train_expert(a, ws, data=data), absent=[ws / "out"], unchanged=[data])


def _d_hash_mismatch(a, ws, ctx):
    data = copy_tree(a.data, ws / "data")
    shard = data / "shard-000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01   # one bit of the tensor data: same size, still parses
    shard.write_bytes(bytes(raw))
    return Run(_train_expert(a, ws, data=data), absent=[ws / "out"], unchanged=[data])


def _d_format_version(a, ws, ctx):
    data = copy_tree(a.data, ws / "data")
    _set_manifest(data, format_version=99)
    return Run(_train_expert(a, ws, data=data), absent=[ws / "out"], unchanged=[data])


def _d_not_prepared(a, ws, ctx):
    (ws / "nodata").mkdir()
    return Run(_train_expert(a, ws, data=ws / "nodata"), absent=[ws / "out"], unchanged=[ws / "nodata"])


def _d_empty_folder(a, ws, ctx):
    (ws / "imgs").mkdir()
    return Run(["data", "prepare", "--config", str(a.config), "--out", str(ws / "data"), "--set",
                "data.source=image_folder", "--set", f"data.path={ws / 'imgs'}"], absent=[ws / "data"])


def _k_truncated(a, ws, ctx):
    ckpt = copy_tree(a.experts[0], ws / "ckpt")
    _truncate(ckpt / "ema.safetensors")
    return Run(_generate(ws, "--expert", ckpt), absent=[ws / "grid.png"], unchanged=[ckpt])


def _k_pickle(a, ws, ctx):
    ckpt = copy_tree(a.experts[0], ws / "ckpt")
    torch.save({"x_embedder.weight": torch.zeros(2), "payload": _Payload(ws / "PAYLOAD_RAN")},
               ckpt / "ema.safetensors")
    _rehash_ckpt(ckpt, "ema.safetensors")
    return Run(_generate(ws, "--expert", ckpt), absent=[ws / "grid.png", ws / "PAYLOAD_RAN"], unchanged=[ckpt])


def _k_wrong_arch(a, ws, ctx):
    ckpt = copy_tree(a.experts[0], ws / "ckpt")
    shutil.copyfile(a.expert_wide / "ema.safetensors", ckpt / "ema.safetensors")
    _rehash_ckpt(ckpt, "ema.safetensors")
    return Run(_generate(ws, "--expert", ckpt), absent=[ws / "grid.png"], unchanged=[ckpt])


def _k_resume_other_arch(a, ws, ctx):
    run = copy_tree(a.expert_run, ws / "run")
    return Run(["train-expert", "--shard", "0", "--config", str(a.config), "--data", str(a.data), "--out",
                str(run), "--set", "expert.hidden_size=64"], unchanged=[run])


def _k_missing_meta(a, ws, ctx):
    ckpt = copy_tree(a.experts[0], ws / "ckpt")
    (ckpt / "meta.json").unlink()
    return Run(_generate(ws, "--expert", ckpt), absent=[ws / "grid.png"], unchanged=[ckpt])


def _e_sizes(a, ws, ctx):
    return Run(_generate(ws, "--ensemble", _bad_ensemble(a, ws, expert1=a.expert_wide)), absent=[ws / "grid.png"])


def _e_router_k(a, ws, ctx):
    return Run(_generate(ws, "--ensemble", _bad_ensemble(a, ws, router=a.router3)), absent=[ws / "grid.png"])


def _e_other_manifest(a, ws, ctx):
    return Run(_generate(ws, "--ensemble", _bad_ensemble(a, ws, expert1=a.expert_foreign)),
               absent=[ws / "grid.png"])


def _s3_env(endpoint: str, key_id: str = KEY_ID, secret: str = SECRET) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


def _s_unreachable(a, ws, ctx):
    return Run(["data", "prepare", "--config", str(a.config), "--out", "s3://arch-unreachable/run/data"],
               env=_s3_env(f"http://127.0.0.1:{_free_port()}"), secrets=[SECRET, KEY_ID])


def _s_wrong_credentials(a, ws, ctx):
    auth = ctx["auth_s3"]
    return Run(["data", "prepare", "--config", str(a.config), "--out", f"s3://{auth['bucket']}/run/data"],
               env=_s3_env(auth["endpoint"], auth["key_id"], SECRET), secrets=[SECRET, auth["key_id"]])


def _s_no_bucket(a, ws, ctx):
    return Run(["data", "prepare", "--config", str(a.config), "--out", "s3://arch-no-such-bucket/run/data"],
               env=_s3_env(ctx["moto"]), secrets=[SECRET, KEY_ID])


def _l_bad_mode(a, ws, ctx):
    return Run(_generate(ws, "--ensemble", a.ensemble, "--mode", "fastest"), absent=[ws / "grid.png"])


def _l_world_size(a, ws, ctx):
    env = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    return Run(["--expert", str(a.experts[0]), "--mode", "sync_patch", "--device", "cpu", "--steps", "2",
                "--out", str(ws / "grid.png")], module="archipelago.inference", env=env,
               absent=[ws / "grid.png"])


def _l_debug(a, ws, ctx):
    cfg = _config_file(ws, "expert:\n  depht: 3\n")
    return Run(["--debug", "data", "prepare", "--config", str(cfg), "--out", str(ws / "data")],
               absent=[ws / "data"])


def _d_escape(target: Callable[[Path, Path], str]):
    """Shard 0's manifest entry names a file outside the data directory: a valid copy of shard 0 (same sha256)
    lies there, so only the containment check can refuse it."""
    def build(a, ws, ctx):
        data = copy_tree(a.data, ws / "data")
        outside = ws / "outside.safetensors"
        shutil.copy(data / "shard-000.safetensors", outside)
        m = json.loads((data / "manifest.json").read_text())
        m["shards"][0]["file"] = target(data, outside)
        (data / "manifest.json").write_text(json.dumps(m))
        return Run(_train_expert(a, ws, data=data), absent=[ws / "out"], unchanged=[data])
    return build


def _n_expert(lr: str):
    def build(a, ws, ctx):
        return Run(_train_expert(a, ws, "--set", f"expert.lr={lr}"), absent=[ws / "out" / "final"],
                   unchanged=[a.data])
    return build


def _n_router(a, ws, ctx):
    return Run(["train-router", "--config", str(a.config), "--data", str(a.data), "--out", str(ws / "router"),
                "--set", "router.lr=1e38"], absent=[ws / "router" / "meta.json", ws / "router" / "router.safetensors"],
               unchanged=[a.data])


CASES = [
    Case("config-unknown-field", ("bad.yaml", "unknown field 'expert.depht'", "known:"), _c_unknown_field),
    Case("config-wrong-type", ("bad.yaml", "field 'expert.lr'", "valid number", "'fast'"), _c_wrong_type),
    Case("config-k-larger-than-data", ("data.num_clusters=5", "number of training samples (3)"), _c_k_too_large),
    Case("config-zero-workers", ("tiny.yaml + --set", "field 'islands.num_workers'", "greater than or equal to 1",
                                 "(got 0)"), _c_zero_workers),
    Case("config-unknown-strategy", ("field 'expert.strategy'", "'horovod'", "single | ddp | fsdp2 | deepspeed"),
         _c_unknown_strategy),
    Case("config-negative-steps", ("field 'expert.steps'", "greater than or equal to 1", "(got -5)"),
         _c_negative_steps),
    Case("config-path-with-brackets", ("[exp1]/bad.yaml", "unknown field 'expert.depht'"), _c_brackets),
    Case("data-missing-shard", ("shard-001.safetensors", "shard 1 is missing", "data prepare"), _d_missing_shard),
    Case("data-truncated-shard", ("shard-000.safetensors", "not a valid safetensors shard", "truncated"),
         _d_truncated),
    Case("data-hash-mismatch", ("shard-000.safetensors", "sha256 mismatch", "data prepare"), _d_hash_mismatch),
    Case("data-format-version", ("manifest.json", "format version 99", "reads 1"), _d_format_version),
    Case("data-not-prepared", ("nodata/manifest.json", "no manifest", "data prepare"), _d_not_prepared),
    Case("data-path-escape", ("data/manifest.json", "shard 0", "'../outside.safetensors'", "outside the data"),
         _d_escape(lambda data, outside: "../outside.safetensors")),
    Case("data-path-absolute", ("data/manifest.json", "shard 0", "outside.safetensors'", "outside the data"),
         _d_escape(lambda data, outside: str(outside))),
    Case("data-path-scheme", ("data/manifest.json", "shard 0", "file://", "outside the data"),
         _d_escape(lambda data, outside: f"file://{outside}")),
    Case("data-empty-image-folder", ("imgs", "no images found", "data.path"), _d_empty_folder),
    Case("ckpt-truncated", ("ckpt/ema.safetensors", "sha256 mismatch", "truncated"), _k_truncated),
    Case("ckpt-pickle", ("ckpt/ema.safetensors", "not a valid safetensors file", "pickle"), _k_pickle),
    Case("ckpt-wrong-architecture", ("ckpt/ema.safetensors", "do not fit the model architecture", "size mismatch"),
         _k_wrong_arch),
    Case("ckpt-resume-other-architecture", ("run/checkpoints/", "meta.json", "architecture differs",
                                            "hidden_size"), _k_resume_other_arch),
    Case("ckpt-missing-meta", ("ckpt", "neither an ensemble.json nor an expert checkpoint", "meta.json"),
         _k_missing_meta),
    Case("diverged-expert", ("expert 0", "non-finite", "at step 1", "no final checkpoint written",
                             "last good checkpoint: none"), _n_expert("1e38")),
    Case("diverged-expert-nan", ("expert 0", "non-finite loss nan at step 2", "no final checkpoint written",
                                 "last good checkpoint:", "out/checkpoints/step-00000001"), _n_expert("1e30")),
    Case("diverged-router", ("router (", "non-finite", "router.on_nonfinite=stop"), _n_router),
    Case("ensemble-expert-sizes", ("expert 1", "expert-wide/final/meta.json", "hidden_size=48",
                                   "expert 0's 32"), _e_sizes),
    Case("ensemble-router-k", ("router", "router3/meta.json", "K=3", "2 experts"), _e_router_k),
    Case("ensemble-other-manifest", ("expert 1", "expert-foreign/final/meta.json", "data manifest",
                                     "other data"), _e_other_manifest),
    Case("storage-unreachable", ("s3://arch-unreachable/run/data", "cannot reach the store", "AWS_ENDPOINT_URL"),
         _s_unreachable),
    Case("storage-wrong-credentials", ("s3://arch-auth/run/data", "permission denied", "check the credentials"),
         _s_wrong_credentials),
    Case("storage-no-bucket", ("s3://arch-no-such-bucket/run/data/", "bucket does not exist"), _s_no_bucket),
    Case("cli-bad-mode", ("generate: --mode", "unknown routing mode 'fastest'", "full | top-1"), _l_bad_mode),
    Case("cli-world-size", ("expert-0/final", "patch_degree=3", "must divide the 4 token rows", "[1, 2, 4]"),
         _l_world_size),
    Case("cli-debug", ("ConfigError", "unknown field 'expert.depht'"), _l_debug, traceback=True),
]


# ----------------------------------------------------------------------------------------------------
# Fixtures: an S3 server that enforces credentials; every case run once, concurrently
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A second real moto_server that checks credentials (moto's IAM auth: INITIAL_NO_AUTH_ACTION_COUNT=4
    lets the 4 set-up calls below through, then every request must be signed by a known IAM key)."""
    import boto3

    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    assert exe, "moto_server not installed: pip install 'moto[server]' (part of the dev extra)"
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "bootstrap",
              "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="robustness")
        key = iam.create_access_key(UserName="robustness")["AccessKey"]
        iam.put_user_policy(UserName="robustness", PolicyName="s3-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **kw).create_bucket(Bucket="arch-auth")
        # Control: the right secret is accepted, so a rejection below is about the credentials only.
        good = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        good.put_object(Bucket="arch-auth", Key="control", Body=b"ok")
        yield {"endpoint": endpoint, "bucket": "arch-auth", "key_id": key["AccessKeyId"], "client": good}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def outcomes(artifacts, moto_server, auth_s3, tmp_path_factory):
    """{case id: (Run, CompletedProcess, digests before)}: every case set up, then run 3 at a time."""
    base = tmp_path_factory.mktemp("bad-inputs")
    ctx = {"moto": moto_server, "auth_s3": auth_s3}
    runs: dict[str, tuple[Run, dict[Path, str]]] = {}
    for case in CASES:
        ws = base / case.id
        ws.mkdir()
        run = case.build(artifacts, ws, ctx)
        runs[case.id] = (run, {p: _tree_digest(p) for p in run.unchanged})

    def go(item):
        cid, (run, _) = item
        return cid, run_module(run.module, *run.argv, env=run.env, timeout=180, cwd=base / cid)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(go, runs.items()))
    return {cid: (run, results[cid], before) for cid, (run, before) in runs.items()}


# ----------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case, outcomes, record_property):
    run, res, before = outcomes[case.id]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    report = f"rc={res.returncode}\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert res.returncode != 0, report
    if case.traceback:
        assert "Traceback" in res.stderr, report
        for needle in case.needles:
            assert needle in res.stderr, (needle, report)
    else:
        assert res.returncode == 2, report
        assert "Traceback" not in res.stderr + res.stdout, report
        assert len(lines) == 1, report
        assert lines[0].startswith("error: "), report
        for needle in case.needles:
            assert needle in lines[0], (needle, report)
    for secret in run.secrets:
        assert secret not in res.stdout + res.stderr, (secret[:4] + "...", report)
    for path in run.absent:
        assert not path.exists(), (f"partial output left: {path}", report)
    for path, digest in before.items():
        assert _tree_digest(path) == digest, (f"{path} was modified by a failed command", report)
    record_property("robustness: bad inputs rejected with one clear line", 1)


@pytest.mark.e2e
def test_wrong_credentials_wrote_nothing(outcomes, auth_s3):
    """The rejected run left no object in the bucket (only the control object of the fixture)."""
    keys = [o["Key"] for o in auth_s3["client"].list_objects_v2(Bucket=auth_s3["bucket"]).get("Contents", [])]
    assert keys == ["control"]


def test_table_lists_every_case():
    doc = sys.modules[__name__].__doc__
    readme = (REPO / "docs" / "robustness.md").read_text()
    for case in CASES:
        assert f"| {case.id} |" in doc, case.id
        assert f"| {case.id} |" in readme, f"docs/robustness.md's table lacks {case.id}"
