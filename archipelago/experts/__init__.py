"""Expert models (image DiT, video DiT) plus their flow-matching loss, samplers and EMA.

Only model code is imported here; the training loop, strategies and checkpoint I/O live in submodules
(`archipelago.experts.train`, `.parallelize`, `.checkpoint`) and are imported explicitly by their users.
"""
from archipelago.experts.dit import DIT_SIZES, DiT, build_dit, model_args
from archipelago.experts.video_dit import VideoDiT, build_video_dit

# Class name -> class, so checkpoint metadata (`type(model).__name__`, `model_args(model)`) rebuilds a model.
MODEL_CLASSES = {"DiT": DiT, "VideoDiT": VideoDiT}

__all__ = ["DIT_SIZES", "MODEL_CLASSES", "DiT", "VideoDiT", "build_dit", "build_video_dit", "model_args"]
