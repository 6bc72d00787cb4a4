"""The router r(x_t, t[, y]) that picks experts per sample and per sampler step, its training job and its
accuracy / calibration / alignment metrics. Submodules: model, train, metrics."""
from archipelago.router.metrics import evaluate_router, expected_calibration_error
from archipelago.router.model import Router, build_router, router_forward_flops
from archipelago.router.train import load_router, train_router

__all__ = ["Router", "build_router", "evaluate_router", "expected_calibration_error", "load_router",
           "router_forward_flops", "train_router"]
