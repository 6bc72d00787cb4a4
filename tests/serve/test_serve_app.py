"""`archipelago serve` for real: the CLI on a private local Ray, a real HTTP client, one application for the
whole module (router + 2 experts with 2 replicas each, a bearer token). Checks that a request gives the bytes
of `archipelago generate`, that concurrent requests are batched and still exact, that every bad request is
one 4xx JSON line, and that SIGKILLing an expert replica under load never hangs a request."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

pytestmark = pytest.mark.e2e

TOKEN = "test-token-7f3a"          # the variable's value: must never appear in the server's output
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
          content_type: str = "application/json", timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {**AUTH, **({"Content-Type": content_type} if data is not None else {}), **(headers or {})}
    req = urllib.request.Request(base + path, data=data, headers={k: v for k, v in hdrs.items() if v is not None},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _stop(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """SIGTERM the CLI (it shuts Serve and its Ray down), then SIGKILL whatever of its tree is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def server(tiny_ensemble, tmp_path_factory):
    """(base URL, ensemble URL, CLI process, log path) of `archipelago serve` answering on 127.0.0.1."""
    ens, _ = tiny_ensemble
    port, log_path = _free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "ARCHIPELAGO_SERVE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    args = ["serve", "--ensemble", ens, "--port", str(port), "--set", "serve.expert_replicas=2",
            "--set", f"serve.request_timeout_s={REQUEST_TIMEOUT_S}", "--set", "serve.call_timeout_s=5",
            "--set", "serve.batch_wait_s=0.02", "--set", "serve.max_n=8", "--set", "serve.max_steps=50",
            "--set", "serve.max_body_bytes=4096"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "archipelago.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base, procs = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 420   # a loaded 2-core machine: minutes; idle: ~40 s
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            procs = psutil.Process(proc.pid).children(recursive=True)
            try:
                if _call(base, "/v1/info", timeout=5)[0] == 200 and b"serving" in log_path.read_bytes():
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "serve did not answer within 420 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield base, ens, proc, log_path
    finally:
        procs = list({p.pid: p for p in procs + _tree(proc)}.values())
        _stop(proc, procs)
    assert TOKEN not in log_path.read_text()


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _replicas(proc: subprocess.Popen, deployment: str) -> list[psutil.Process]:
    """The live replica processes of one deployment (Ray titles them ray::ServeReplica:<app>:<name>)."""
    out = []
    for p in _tree(proc):
        try:
            if f"ServeReplica:archipelago:{deployment}" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_healthz_is_open_and_info_names_the_ensemble(server):
    from archipelago.ensemble import read_spec

    base, ens, _, _ = server
    assert _call(base, "/healthz", headers={"Authorization": None})[:1] == (200,)
    status, _, body = _call(base, "/v1/info")
    info, spec = json.loads(body), read_spec(ens)
    assert status == 200 and info["K"] == 2 and [e["id"] for e in info["experts"]] == [0, 1]
    assert info["config_hash"] == spec.config_hash and info["data_manifest_sha256"] == spec.data_manifest_sha256
    assert info["router"].endswith("router") and info["auth"] == "bearer" and info["limits"]["max_n"] == 8


def test_generate_gives_the_bytes_of_archipelago_generate(server, tmp_path):
    from typer.testing import CliRunner

    from archipelago.cli import app

    base, ens, _, _ = server
    flags = {"n": 3, "steps": 3, "cfg": 1.5, "seed": 7, "routing": "top-2"}
    out = CliRunner().invoke(app, ["generate", "--ensemble", ens, "--mode", "top-2", "--n", "3", "--cfg", "1.5",
                                   "--seed", "7", "--steps", "3", "--out", str(tmp_path / "g.png"),
                                   "--save-tensor", str(tmp_path / "s.safetensors")])
    assert out.exit_code == 0, out.output
    status, headers, png = _call(base, "/v1/generate", flags)
    assert status == 200 and headers["content-type"] == "image/png", (status, png[:300])
    assert png == (tmp_path / "g.png").read_bytes()
    status, _, tensors = _call(base, "/v1/generate", {**flags, "output": "safetensors"})
    assert status == 200, tensors[:300]
    if tensors != (tmp_path / "s.safetensors").read_bytes():   # say what differs: numbers or metadata
        from safetensors import safe_open
        from safetensors.torch import load

        with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
            want_meta = f.metadata()
        got, want = load(tensors), load((tmp_path / "s.safetensors").read_bytes())
        diff = (got["samples"] - want["samples"]).abs().max().item()
        pytest.fail(f"safetensors differ: max abs diff {diff}, labels {got['labels']} vs {want['labels']}, "
                    f"header {tensors[8:400]!r} vs meta {want_meta}")
    # Explicit labels equal to generate's default labels: the same request.
    assert _call(base, "/v1/generate", {**flags, "classes": [0, 1, 2]})[2] == png


def test_concurrent_requests_are_batched_and_each_stays_exact(server):
    from safetensors.torch import load

    from archipelago.ensemble import load_ensemble
    from archipelago.generate import generate

    base, ens, _, _ = server
    before = json.loads(_call(base, "/v1/info")[2])["batching"]["calls_by_batch_size"]
    reqs = [{"n": 2, "steps": 4, "seed": s, "cfg": 1.0 + s % 2, "routing": ("top-1", "full")[s % 2],
             "classes": [s % 10, (s + 3) % 10], "output": "safetensors"} for s in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda r: _call(base, "/v1/generate", r), reqs))
    assert [a[0] for a in answers] == [200] * len(reqs), [a[2][:200] for a in answers]
    after = json.loads(_call(base, "/v1/info")[2])["batching"]
    grown = {int(s) for s, c in after["calls_by_batch_size"].items() if c > before.get(s, 0)}
    assert max(grown) > 1, after                          # calls of different requests ran as one batch
    model = load_ensemble(ens)
    for r, (_, _, body) in zip(reqs, answers, strict=True):
        model.mode = r["routing"]
        x = generate(model, r["n"], cfg_scale=r["cfg"], seed=r["seed"], steps=r["steps"],
                     classes=torch.tensor(r["classes"]))
        assert torch.equal(load(body)["samples"], x), r   # batched with others, still generate's numbers


@pytest.mark.parametrize("case", [
    "json", "not_object", "class", "n_low", "n_high", "steps", "content_type", "too_big", "routing",
    "field", "output", "no_token", "wrong_token", "path"])
def test_bad_requests_are_one_line_4xx_and_the_server_keeps_serving(server, case):
    base, _, _, _ = server
    good = {"n": 1, "steps": 2}
    cases = {
        "json": (b'{"n": 1,', {}, "application/json", 400, "invalid JSON"),
        "not_object": (b"[1, 2]", {}, "application/json", 400, "JSON object"),
        "class": ({**good, "classes": [10]}, {}, "application/json", 422, "classes must be 1 labels in [0, 10)"),
        "n_low": ({**good, "n": 0}, {}, "application/json", 422, "n=0 must be in [1, 8]"),
        "n_high": ({**good, "n": 9}, {}, "application/json", 422, "n=9 must be in [1, 8]"),
        "steps": ({**good, "steps": 51}, {}, "application/json", 422, "steps=51 must be in [1, 50]"),
        "content_type": (json.dumps(good).encode(), {}, "text/plain", 415, "application/json"),
        "too_big": ({**good, "pad": "x" * 5000}, {}, "application/json", 413, "over the limit of 4096"),
        "routing": ({**good, "routing": "top-3"}, {}, "application/json", 422, "needs at least 3 experts"),
        "field": ({**good, "size": 3}, {}, "application/json", 422, "unknown field(s) ['size']"),
        "output": ({**good, "output": "gif"}, {}, "application/json", 422, "png | safetensors"),
        "no_token": (good, {"Authorization": None}, "application/json", 401, "bearer token"),
        "wrong_token": (good, {"Authorization": "Bearer nope"}, "application/json", 401, "bearer token"),
        "path": (good, {}, "application/json", 404, "Not Found"),
    }
    body, headers, kind, code, text = cases[case]
    status, hdrs, raw = _call(base, "/v1/nothing" if case == "path" else "/v1/generate", body, headers, kind)
    doc = json.loads(raw)
    assert status == code and list(doc) == ["error"] and text in doc["error"] and "\n" not in doc["error"], doc
    assert hdrs["content-type"] == "application/json"
    assert _call(base, "/v1/generate", good)[0] == 200


def test_a_killed_expert_replica_never_hangs_a_request(server):
    base, _, proc, _ = server
    replicas = _replicas(proc, "expert-0")
    assert len(replicas) == 2, [p.cmdline() for p in _tree(proc)]

    def timed(seed: int) -> tuple[int, float, bytes]:
        t0 = time.monotonic()
        status, _, body = _call(base, "/v1/generate", {"n": 2, "steps": 12, "seed": seed, "routing": "full"},
                                timeout=REQUEST_TIMEOUT_S + 30)
        return status, time.monotonic() - t0, body

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(timed, s) for s in range(24)]
        time.sleep(1.0)                                   # requests in flight on both replicas
        os.kill(replicas[0].pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    for status, took, body in results:
        assert status in (200, 503), body[:300]
        assert took < REQUEST_TIMEOUT_S + 5, took        # answered (or refused) within the timeout, never hung
        if status == 503:
            assert "did not answer" in json.loads(body)["error"]
    assert sum(s == 200 for s, _, _ in results) >= len(results) // 2, [r[:2] for r in results]
    assert _call(base, "/v1/generate", {"n": 1, "steps": 2})[0] == 200


def test_a_dead_member_is_a_503_line_after_the_deadline():
    """RemoteMember against a handle whose every replica is dead: retried until the deadline, then Unavailable."""
    from ray.exceptions import ActorDiedError

    from archipelago.serve.remote import BatchStats, Deadline, RemoteMember, Unavailable, retryable_errors

    retryable_errors()   # imports ray.serve (seconds) before the deadline starts

    class Dead:
        def result(self, timeout_s: float) -> None:
            raise ActorDiedError()

        def cancel(self) -> None:
            pass

    class Handle:
        def remote(self, *args: object) -> Dead:
            return Dead()

    stats = BatchStats()
    member = RemoteMember("expert-0", Handle(), stats, Deadline(0.6, 0.3))
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="expert-0 did not answer within the request timeout"):
        member(torch.zeros(1, 1, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert time.monotonic() - t0 < 2.0 and stats.retries >= 2


def test_serve_refuses_a_broken_ensemble_in_one_line(tmp_path, cli):
    done = cli("serve", "--ensemble", str(tmp_path / "nope.json"), timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "nope.json" in done.stderr
