"""Distributed inference for experts and ensembles: patch parallelism (naive, sync, DistriFusion), sequence
parallelism (Ulysses, ring, USP), PipeFusion, CFG parallel and expert parallel, applied from outside the
model; launched by torchrun or Ray actors.

Public API: ParallelConfig / Mode (layout), Comm (accounted collectives), parallelize_for_inference,
parallel_sample, run_parallel_sampling / SamplingSpec (the per-rank entry point), launch_ray.
"""
from archipelago.inference.comm import Comm
from archipelago.inference.config import Mode, ParallelConfig
from archipelago.inference.parallelize import parallelize_for_inference
from archipelago.inference.runner import SamplingResult, SamplingSpec, parallel_sample, run_parallel_sampling

__all__ = ["Comm", "Mode", "ParallelConfig", "SamplingResult", "SamplingSpec", "launch_ray",
           "parallel_sample", "parallelize_for_inference", "run_parallel_sampling"]


def __getattr__(name: str):   # Ray is imported only by who launches with it
    if name == "launch_ray":
        from archipelago.inference.ray_launcher import launch_ray

        return launch_ray
    raise AttributeError(name)
