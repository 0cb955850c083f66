"""Batched patch reading and prediction over a patch grid.

- :mod:`.reading`: patches read in blocks (one region of many neighbouring patches at the model's
  um/px, the pyramid level closest to the model), cut in memory, by a few threads sharing one
  slide handle.
- :mod:`.device`: device and precision (autocast bf16/fp16 on CUDA, fp32 on a CPU), the CPU graph
  path (frozen + oneDNN fusion), the CUDA batch size.
- :mod:`.loop`: :func:`run_inference`, its config and result.
- :mod:`.tta`: test-time augmentation: the views of a batch (flips, dihedral) and their mean and spread.
- :mod:`.mc_dropout`: Monte-Carlo dropout: a fastai model's body run once, its head K times with dropout sampled.

Imports flow one way: this package imports :mod:`wsi_toolkit.runtime` and
:mod:`wsi_toolkit.model_package`, neither imports it. So what they share is defined below and
re-exported here: :func:`probabilities` (the one logits -> probabilities rule) from
:mod:`wsi_toolkit.model_package.logits`, :func:`cpu_has_fast_bf16` from :mod:`wsi_toolkit.runtime.cpu`.
"""

from __future__ import annotations

from wsi_toolkit.inference.device import (
    CPU_BATCH_SIZE,
    CpuGraph,
    autocast_dtype,
    batch_for_memory,
    cpu_has_fast_bf16,
    cuda_batch_size,
    prepare_model,
    resolve_device,
)
from wsi_toolkit.inference.loop import InferenceConfig, InferenceResult, probabilities, run_inference
from wsi_toolkit.inference.mc_dropout import McDropoutModel, head_dropout_ps, split_for_mc_dropout
from wsi_toolkit.inference.reading import Block, PatchBlocks, cut_patches, plan_blocks, single_patch_blocks
from wsi_toolkit.inference.tta import TTA_MODES, TtaMode, combine_views, make_views, n_views

__all__ = ["CPU_BATCH_SIZE", "TTA_MODES", "Block", "CpuGraph", "InferenceConfig", "InferenceResult", "McDropoutModel",
           "PatchBlocks", "TtaMode", "autocast_dtype", "batch_for_memory", "combine_views",
           "cpu_has_fast_bf16", "cuda_batch_size", "cut_patches", "head_dropout_ps", "make_views", "n_views",
           "plan_blocks", "prepare_model", "probabilities", "resolve_device", "run_inference", "single_patch_blocks",
           "split_for_mc_dropout"]
