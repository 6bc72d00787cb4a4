"""Ray launcher: N actors in a placement group form one torch.distributed group and work together
(`launch_actors`, shared by image sampling and DualParal video).

This is how inference spans nodes (islands without a shared launcher): rank 0's actor reports its node IP
and a free port, which become the TCP rendezvous (MASTER_ADDR/PORT) of every actor; then each actor calls
the same `run_parallel_sampling` as the torchrun launcher (gloo on CPU, nccl on GPU).

    import ray; ray.init(address="auto")
    result = launch_ray(SamplingSpec(experts=[url], out="grid.png"),
                        ParallelConfig(mode="distrifusion", world_size=4))
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from archipelago.errors import ArchipelagoError
from archipelago.inference.config import ParallelConfig
from archipelago.inference.runner import SamplingResult, SamplingSpec, run_parallel_sampling

T = TypeVar("T")


class InferenceWorker:
    """One rank (a Ray actor): tells where it runs, then samples its share (`run`); DualParal's worker
    adds its own method."""

    def __init__(self, env: dict[str, str]):
        os.environ.update(env)
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))

    def address(self) -> tuple[str, int]:
        """(node IP, a port free on it right now) - the rendezvous when this actor is rank 0."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def run(self, spec: dict[str, Any], pcfg: dict[str, Any], rank: int, init_method: str,
            warmup_runs: int) -> SamplingResult:
        import ray

        os.environ.setdefault("LOCAL_RANK", "0")   # one GPU per actor: Ray sets CUDA_VISIBLE_DEVICES
        result = run_parallel_sampling(SamplingSpec(**spec), ParallelConfig(**pcfg), rank=rank,
                                       init_method=init_method, warmup_runs=warmup_runs)
        result.node = ray.util.get_node_ip_address()
        return result


def placement_strategy(num_nodes: int, num_actors: int) -> str:
    """STRICT_SPREAD (one rank per node) when there are enough nodes, SPREAD when several but fewer,
    PACK on one node (co-located ranks talk through shared memory)."""
    if num_nodes <= 1:
        return "PACK"
    return "STRICT_SPREAD" if num_nodes >= num_actors else "SPREAD"


def launch_actors(worker_cls: type[InferenceWorker], world_size: int,
                  submit: Callable[[Any, int, str], Any], cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, strategy: str | None = None, timeout_s: float = 600,
                  env: dict[str, str] | None = None, rank_resources: list[str] | None = None) -> list[Any]:
    """world_size actors of worker_cls in one placement group; `submit(actor, rank, init_method)` starts each
    rank's work (an ObjectRef) and every rank's result comes back in rank order. The one Ray launcher of image
    and video inference.

    rank_resources: a custom Ray resource per rank (e.g. ["node_1", "node_2"]: the `node_<i>` resource a
    namespace or cluster node advertises) that pins rank i to the node holding it.
    Needs a connected Ray (`ray.init(...)`); the placement group is removed afterwards even on failure.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError("the Ray launcher needs a running Ray: call ray.init(...) first")
    n = world_size
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    strategy = strategy or ("SPREAD" if rank_resources else placement_strategy(len(nodes), n))
    bundle: dict[str, float] = {"CPU": cpus_per_actor}
    if gpus_per_actor:
        bundle["GPU"] = gpus_per_actor
    if rank_resources is not None and len(rank_resources) != n:
        raise ValueError(f"rank_resources names {len(rank_resources)} resources for {n} ranks")
    bundles = [dict(bundle) for _ in range(n)]
    for b, res in zip(bundles, rank_resources or [], strict=False):
        b[res] = 0.001   # a sliver: several ranks may share a node
    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
        env = {"OMP_NUM_THREADS": str(max(int(cpus_per_actor), 1)), **(env or {})}
        actor_cls = ray.remote(worker_cls)
        actors = [
            actor_cls.options(
                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i),
            ).remote(env)
            for i in range(n)]
        try:
            ip, port = ray.get(actors[0].address.remote(), timeout=timeout_s)
            init_method = f"tcp://{ip}:{port}"
            refs = [submit(a, rank, init_method) for rank, a in enumerate(actors)]
            return ray.get(refs, timeout=timeout_s)
        finally:
            for a in actors:
                ray.kill(a)
    finally:
        remove_placement_group(pg)


def launch_ray(spec: SamplingSpec, pcfg: ParallelConfig, cpus_per_actor: float = 1.0,
               gpus_per_actor: float = 0.0, strategy: str | None = None, warmup_runs: int = 0,
               timeout_s: float = 600, env: dict[str, str] | None = None,
               rank_resources: list[str] | None = None) -> list[SamplingResult]:
    """Run `spec` with `pcfg` on `pcfg.world_size` Ray actors; returns every rank's result (rank order).
    See `launch_actors` for the placement and rank_resources."""
    args = (spec.model_dump(), pcfg.model_dump(mode="json"))
    return launch_actors(InferenceWorker, pcfg.world_size,
                         lambda a, rank, init_method: a.run.remote(*args, rank, init_method, warmup_runs),
                         cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, strategy=strategy,
                         timeout_s=timeout_s, env=env, rank_resources=rank_resources)


def on_ray(launch: Callable[[dict[str, str]], T], ray_address: str | None, hint: str) -> T:
    """Connect to the Ray at ray_address ($RAY_ADDRESS, else a local Ray), run `launch(env)` (env: the
    socket settings the ranks inherit) and shut down a Ray started here; a launcher failure is one line."""
    import ray

    from archipelago.cluster.local import connect_ray

    started = connect_ray(ray_address, hint=hint, include_dashboard=False, log_to_driver=False)
    try:
        # GLOO_SOCKET_IFNAME passes through: on multi-homed nodes (namespaces, pods) it names the NIC to use
        env = {k: os.environ[k] for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ}
        return launch(env)
    except RuntimeError as exc:
        raise ArchipelagoError(f"ray launcher: {exc}") from None
    finally:
        if started:
            ray.shutdown()
