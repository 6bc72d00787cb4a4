"""Real multi-node networking on one machine: network namespaces on a bridge, links shaped with tc tbf, a Ray
node in each namespace. Needs root (CI runs as root); every address used here exists only inside the
namespaces these tests create, and every test checks that it leaves nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archipelago.cluster import netns
from archipelago.cluster.netns import LinkBytes, NetnsCluster, NetnsConfig, NetnsError, link_delta, parse_rate

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="network namespaces need root (CI runs as root)")
REPO = Path(__file__).resolve().parents[2]

# Receiver on one node: prints "ready", reads until EOF, acknowledges with one byte.
RECEIVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 5201))
print("ready", flush=True)
conn, _ = srv.accept()
n = 0
while chunk := conn.recv(1 << 16):
    n += len(chunk)
conn.sendall(b"k")
print(n, flush=True)
"""
# Sender on another node: times connect .. acknowledgement of `size` bytes.
SENDER = """
import socket, sys, time
size = int(sys.argv[2])
t0 = time.perf_counter()
conn = socket.create_connection((sys.argv[1], 5201), timeout=30)
conn.sendall(b"x" * size)
conn.shutdown(socket.SHUT_WR)
assert conn.recv(1) == b"k"
print(time.perf_counter() - t0, flush=True)
"""


def transfer(net: NetnsCluster, src: int, dst: int, size: int) -> float:
    """Seconds to send `size` bytes over TCP from node `src` to node `dst` (both inside their namespaces)."""
    rx = subprocess.Popen(net.exec_argv(dst, [sys.executable, "-c", RECEIVER, net.node_ip(dst)]),
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        tx = subprocess.run(net.exec_argv(src, [sys.executable, "-c", SENDER, net.node_ip(dst), str(size)]),
                            check=False, capture_output=True, text=True, timeout=60)
        assert tx.returncode == 0, tx.stderr
        assert int(rx.stdout.readline()) == size
        return float(tx.stdout.strip())
    finally:
        rx.kill()
        rx.wait()


def root_view() -> tuple[set[str], str, str]:
    """The root namespace's interfaces, addresses and routes (our subnet must never appear there)."""
    links = {d["ifname"] for d in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                             text=True, check=True).stdout)}
    addrs = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-j", "route", "show", "table", "all"], capture_output=True, text=True,
                            check=True).stdout
    return links, addrs, routes


def assert_gone(net: NetnsCluster) -> None:
    left = set(net.namespaces) & set(netns.list_namespaces())
    assert not left, f"namespaces left behind: {left}"
    assert not (Path(net.config.temp_root) / net.prefix).exists()
    ps = subprocess.run(["ps", "-eo", "args"], check=False, capture_output=True, text=True).stdout
    assert f"/{net.prefix}/" not in ps, [ln for ln in ps.splitlines() if net.prefix in ln]


# ----------------------------------------------------------------------------------------------------
# Without root: parsing and the host check
# ----------------------------------------------------------------------------------------------------

def test_parse_rate_units_and_refusals():
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1.5gbit") == 1_500_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate(None) is None and parse_rate("none") is None
    for bad in ("100mbps", "fast", "1kbit"):
        with pytest.raises(NetnsError):
            parse_rate(bad)
    assert NetnsConfig(link_rate="none").link_rate is None
    with pytest.raises(NetnsError, match="private"):
        NetnsConfig(subnet="8.8.8.0/24")
    with pytest.raises(NetnsError, match="room for 2 nodes"):
        NetnsConfig(nodes=3, subnet="10.213.0.0/30")
    assert LinkBytes(10, 5) - LinkBytes(4, 1) == LinkBytes(6, 4)
    assert link_delta({0: LinkBytes(1, 2)}, {0: LinkBytes(11, 2)}) == {0: LinkBytes(10, 0)}


def test_host_check_names_root_and_iproute2(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="need root"):
        NetnsCluster(NetnsConfig(nodes=2, ray=False)).up()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    with pytest.raises(NetnsError, match="iproute2"):
        netns.check_host()


# ----------------------------------------------------------------------------------------------------
# (a) the network: reachability, isolation from the root namespace, shaping, counters, teardown
# ----------------------------------------------------------------------------------------------------

@needs_root
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_two_namespaces_shaped_link():
    rate, size = "20mbit", 2_000_000
    before = root_view()
    net = NetnsCluster(NetnsConfig(nodes=2, link_rate=rate, ray=False))
    with net:
        # ---- the root namespace never sees our interfaces, subnet or routes -----------------------------
        links, addrs, routes = root_view()
        assert links == before[0]
        assert "10.213." not in addrs and "10.213." not in routes

        # ---- shaped: ~size*8/rate seconds; the counters saw every byte ---------------------------------
        bytes0 = net.link_bytes()
        shaped = transfer(net, 0, 1, size)
        moved = link_delta(bytes0, net.link_bytes())
        theory = size * 8 / parse_rate(rate)
        assert shaped >= 0.6 * theory, (shaped, theory)
        assert shaped < 10 * theory, (shaped, theory)
        assert moved[0].sent >= size and moved[1].received >= size, moved
        assert moved[1].sent < size / 10, moved          # only ACKs flow back

        # ---- unshaped: the same transfer is much faster ------------------------------------------------
        net.shape(None)
        with net.phase("unshaped") as unshaped_bytes:
            unshaped = transfer(net, 1, 0, size)
        assert shaped > 3 * unshaped, (shaped, unshaped)
        assert unshaped_bytes[1].sent >= size and net.phases["unshaped"] == unshaped_bytes
    assert_gone(net)
    assert root_view()[0] == before[0]


@needs_root
@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_cleanup_after_a_crash_kills_processes_and_removes_namespaces(cli):
    net = NetnsCluster(NetnsConfig(nodes=2, link_rate="50mbit", ray=False)).up()
    # A process still running inside a node, and no down(): what a crashed harness leaves behind.
    stray = subprocess.Popen(net.exec_argv(1, ["sleep", "300"]), start_new_session=True)
    assert stray.pid in netns.namespace_pids(net.node_ns(1))
    res = cli("cluster", "cleanup", "--prefix", net.prefix)
    assert res.returncode == 0, res.stderr
    assert "removed 3 namespaces" in res.stdout and net.switch_ns in res.stdout
    assert stray.wait(timeout=10) != 0                   # killed, not finished
    assert_gone(net)
    res = cli("cluster", "cleanup", "--prefix", net.prefix)
    assert res.returncode == 0 and "no namespaces" in res.stdout


@needs_root
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cli_cluster_local_up_and_down(cli, tmp_path):
    state = tmp_path / "netns.json"
    res = cli("cluster", "local", "--nodes", "2", "--link-rate", "50mbit", "--no-dashboard",
              "--state-file", str(state))
    assert res.returncode == 0, res.stderr
    net = NetnsCluster.from_state(state)
    try:
        assert net.is_running() and f"ip netns exec {net.node_ns(0)}" in res.stdout
        assert f"head address (from inside a node): {net.head_address}" in res.stdout
        assert "tbf" in subprocess.run(["tc", "-n", net.node_ns(1), "qdisc"], check=False,
                                       capture_output=True, text=True).stdout
        again = cli("cluster", "local", "--state-file", str(state))
        assert again.returncode == 0 and f"already running: namespace cluster {net.prefix}" in again.stdout
        res = cli("cluster", "local", "--down", "--state-file", str(state))
        assert res.returncode == 0 and f"stopped namespace cluster {net.prefix}" in res.stdout, res.stderr
        assert not state.exists()
        assert_gone(net)
    finally:
        net.down()


# ----------------------------------------------------------------------------------------------------
# (b) a 3-node Ray cluster; the driver runs inside node 0
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_net():
    """3 Ray nodes (1 CPU, 200 MB object store each) on 100mbit links; torn down after the module."""
    if not ROOT:
        pytest.skip("network namespaces need root (CI runs as root)")
    net = NetnsCluster(NetnsConfig(nodes=3, link_rate="100mbit", num_cpus=1, object_store_mb=200))
    with net:
        yield net
    assert_gone(net)


DRIVER = """
import json, os, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])

@ray.remote(resources={"node_2": 1})
def where(blob):
    return ray.util.get_node_ip_address(), len(blob)

ip, n = ray.get(where.remote(ray.put(b"x" * 3_000_000)))   # the object travels node 0 -> node 2
print(json.dumps({"alive": alive, "driver_ip": ray.util.get_node_ip_address(), "task_ip": ip, "n": n,
                  "resources": {k: v for k, v in ray.cluster_resources().items() if k.startswith("node_")}}))
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_cluster_in_namespaces(ray_net):
    with ray_net.phase("driver") as moved:
        res = subprocess.run(ray_net.exec_argv(0, [sys.executable, "-c", DRIVER]), check=False,
                             capture_output=True, text=True, env=ray_net.driver_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ips = [ray_net.node_ip(i) for i in range(3)]
    assert out["alive"] == sorted(ips)
    assert out["driver_ip"] == ips[0] and out["task_ip"] == ips[2] and out["n"] == 3_000_000
    assert out["resources"] == {"node_0": 1.0, "node_1": 1.0, "node_2": 1.0}
    # The 3 MB argument crossed node 0's and node 2's links, not node 1's.
    assert moved[0].sent >= 3_000_000 and moved[2].received >= 3_000_000, moved
    assert moved[1].received < 1_000_000, moved


# ----------------------------------------------------------------------------------------------------
# (c) two islands pinned to different nodes train; the ensemble loads
# ----------------------------------------------------------------------------------------------------

# K=2 shards of 8x8 digits; experts of ~5k parameters and 10 steps; a router of 10 steps; 16 samples.
TINY = {
    "name": "netns-test",
    "data": {"image_size": 8, "num_clusters": 2, "seed": 0},
    "expert": {"hidden_size": 16, "depth": 1, "num_heads": 2, "patch_size": 2, "steps": 10, "batch_size": 16,
               "warmup_steps": 2, "checkpoint_every": 5, "log_every": 2, "sample_steps": 4, "seed": 0},
    "router": {"hidden_size": 8, "depth": 1, "steps": 10, "batch_size": 16},
    "islands": {"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1, "max_concurrent": 2},
    "inference": {"num_samples": 16, "routing": "top-1"},
    "tracking": {"enabled": True, "experiment": "netns-test"},
}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_islands_pinned_to_nodes_train_an_ensemble(ray_net, tmp_path):
    import yaml

    root = tmp_path / "run"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**TINY, "storage": {"root": str(root)}}, sort_keys=False))
    env = ray_net.driver_env()
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    argv = [sys.executable, "-m", "archipelago.cli", "train", "--config", str(config_file),
            "--set", "islands.per_island.0.resources.node_1=1", "--set", "islands.per_island.1.resources.node_2=1"]
    t0 = time.perf_counter()
    with ray_net.phase("train") as moved:
        res = subprocess.run(ray_net.exec_argv(0, argv), check=False, capture_output=True, text=True,
                             env=env, timeout=280, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"pipeline on 3 namespace nodes: {time.perf_counter() - t0:.0f}s; bytes per link "
          f"{ {i: (b.sent, b.received) for i, b in moved.items()} }")

    # Islands exchange no weights or gradients: only Ray's control traffic crosses their links.
    assert all(0 < moved[i].total < 5_000_000 for i in (1, 2)), moved

    summary = json.loads((root / "pipeline.json").read_text())
    assert summary["ok"] and [i["status"] for i in summary["islands"]] == ["trained", "trained"]

    # ---- each island ran on the node it was pinned to (its MLflow run records the Ray node) ------------
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("netns-test").experiment_id])
    node_of = {r.info.run_name: r.data.tags.get("archipelago.node_ip") for r in runs}
    assert node_of["island-0"] == ray_net.node_ip(1) and node_of["island-1"] == ray_net.node_ip(2), node_of

    # ---- the ensemble loads --------------------------------------------------------------------------
    from archipelago.ensemble import load_ensemble

    ensemble = load_ensemble(str(root / "ensemble.json"))
    assert len(ensemble.experts) == 2


# ----------------------------------------------------------------------------------------------------
# (d) inference ranks on two nodes (Ray launcher, pinned) equal one device
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_inference_ranks_on_two_nodes_equal_single_device(ray_net, tmp_path):
    import torch
    from safetensors.torch import load_file

    from archipelago.experts.checkpoint import save_for_inference
    from archipelago.experts.dit import DiT
    from archipelago.inference.config import ParallelConfig
    from archipelago.inference.launch import sampling_spec
    from archipelago.inference.runner import run_parallel_sampling

    model = DiT(input_size=16, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # adaLN-Zero would output exactly 0: perturb every weight
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ckpt = save_for_inference(model.eval(), str(tmp_path / "expert"))
    ref = run_parallel_sampling(sampling_spec(ckpt, n=4, steps=4, cfg_scale=2.0, seed=3, device="cpu"),
                                ParallelConfig()).samples

    env = ray_net.driver_env()
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "eth0"})
    out, stats = tmp_path / "x.safetensors", tmp_path / "stats.json"
    argv = [sys.executable, "-m", "archipelago.cli", "generate", "--expert", ckpt, "--n", "4", "--steps", "4",
            "--cfg", "2.0", "--seed", "3", "--parallel", "sync_patch", "--world-size", "2", "--launcher", "ray",
            "--pin", "node_1,node_2", "--out", str(tmp_path / "grid.png"), "--save-tensor", str(out),
            "--stats", str(stats)]
    with ray_net.phase("inference") as moved:
        res = subprocess.run(ray_net.exec_argv(0, argv), check=False, capture_output=True, text=True, env=env,
                             timeout=200, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    torch.testing.assert_close(load_file(str(out))["samples"], ref, atol=1e-5, rtol=1e-5)
    ranks = json.loads(stats.read_text())["ranks"]
    assert [r["node"] for r in ranks] == [ray_net.node_ip(1), ray_net.node_ip(2)], ranks
    # the K/V all-gathers crossed both ranks' links
    kv = ranks[0]["comm"]["by_type"]["attn_kv"]["bytes"]
    assert kv > 0 and moved[1].received >= kv and moved[2].sent >= kv, (kv, moved)


# ----------------------------------------------------------------------------------------------------
# (e) a node dies mid-training: its island fails alone, a re-run resumes it elsewhere from its checkpoint.
# Last in the module: it kills node 1 of the shared cluster.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_node_loss_fails_only_its_island_and_a_rerun_resumes_it_elsewhere(ray_net, tmp_path):
    import yaml

    from archipelago.ensemble import load_ensemble

    root = tmp_path / "run"
    slow = {**TINY, "expert": {**TINY["expert"], "steps": 3000, "checkpoint_every": 250, "log_every": 250},
            "islands": {**TINY["islands"], "max_failures": 0}, "tracking": {"enabled": False},
            "storage": {"root": str(root)}}
    config_file = tmp_path / "slow.yaml"
    config_file.write_text(yaml.safe_dump(slow, sort_keys=False))
    env = ray_net.driver_env()
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    base = [sys.executable, "-m", "archipelago.cli", "train", "--config", str(config_file),
            "--set", "islands.per_island.1.resources.node_2=1"]

    first = subprocess.Popen(ray_net.exec_argv(0, [*base, "--set", "islands.per_island.0.resources.node_1=1"]),
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = root / "experts" / "expert-0" / "checkpoints"

    def complete() -> list[int]:   # meta.json is written last: the commit marker of a checkpoint
        return sorted(int(m.parent.name.split("-")[1]) for m in ckpts.glob("step-*/meta.json"))

    deadline = time.monotonic() + 240
    # past the step-1 checkpoint: a kill during it would leave nothing to resume from (correctly: step 0)
    while time.monotonic() < deadline and first.poll() is None and not [s for s in complete() if s >= 250]:
        time.sleep(0.1)
    assert [s for s in complete() if s >= 250], "island 0 wrote no periodic checkpoint before the deadline"
    netns.kill_namespaces([ray_net.node_ns(1)])          # node 1 (raylet, island 0's worker) is gone
    out, err = first.communicate(timeout=300)
    assert first.returncode != 0, out[-2000:] + err[-2000:]
    summary = json.loads((root / "pipeline.json").read_text())
    status = {i["shard"]: i["status"] for i in summary["islands"]}
    assert status == {0: "failed", 1: "trained"}, summary["islands"]
    island1_meta = (root / "experts" / "expert-1" / "final" / "meta.json").read_bytes()
    last = complete()[-1]
    assert 250 <= last < 3000, complete()

    # Re-run with island 0 on node 0: it resumes from its last checkpoint; island 1 is left as it was.
    res = subprocess.run(ray_net.exec_argv(0, [*base, "--set", "islands.per_island.0.resources.node_0=1"]),
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((root / "pipeline.json").read_text())
    islands = {i["shard"]: i for i in summary["islands"]}
    assert islands[0]["status"] == "trained" and islands[0]["start_step"] == last, (islands[0], last)
    assert islands[1]["status"] == "skipped", islands[1]
    assert (root / "experts" / "expert-1" / "final" / "meta.json").read_bytes() == island1_meta
    assert len(load_ensemble(str(root / "ensemble.json")).experts) == 2
