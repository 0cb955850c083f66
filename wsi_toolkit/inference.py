"""Batched patch reading and prediction over a patch grid.

Reading is the bottleneck of slide inference, so it runs in DataLoader worker processes, each
with its own slide handle, reading at the model's um/px through
:meth:`wsi_toolkit.slide.SlideReader.read_at_mpp` (the pyramid level closest to the model,
never level 0 for a ~1 um/px model). Batches travel as uint8 (4x less than float) in pinned
memory; resizing and normalisation run on the device (:class:`wsi_toolkit.model_package.Preprocess`).
On CUDA the model runs under autocast (bf16 where supported, else fp16) in channels_last.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.model_package import ModelPackage, Preprocess
from wsi_toolkit.slide import open_slide

__all__ = ["InferenceConfig", "InferenceResult", "PatchBatches", "resolve_device", "run_inference"]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class InferenceConfig:
    """How patches are read and predicted.

    ``workers=None`` picks ``min(4, cpu_count - 1)`` reader processes (0 = read in this process).
    ``precision="auto"`` is fp32 on CPU/MPS and bf16 (else fp16) autocast on CUDA.
    """

    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    precision: Precision = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ConfigError(f"batch_size must be a positive integer; got {self.batch_size!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ConfigError(f"workers must be a non-negative integer; got {self.workers!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16; got {self.precision!r}")
        resolve_device(self.device)  # validates

    def n_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(0, min(4, (os.cpu_count() or 1) - 1))

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' asked for but MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
    return dev


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto on CUDA
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class PatchBatches(torch.utils.data.Dataset):
    """Dataset whose item ``i`` is batch ``i``: (uint8 (B, H, W, 3) tensor, index tensor, read seconds).

    Each worker opens its own slide handle on first use (handles are not shared across processes).
    """

    def __init__(self, slide_path: str | Path, patch_l0_xy: np.ndarray, *, patch_px: int, spacing_um_px: float,
                 batch_size: int, mpp: float | None = None, backend: str = "auto"):
        self.slide_path = str(slide_path)
        self.patch_l0_xy = np.asarray(patch_l0_xy, np.float64)
        self.patch_px = int(patch_px)
        self.spacing_um_px = float(spacing_um_px)
        self.batch_size = int(batch_size)
        self.mpp = mpp
        self.backend = backend
        self._slide = None

    def __len__(self) -> int:
        return math.ceil(len(self.patch_l0_xy) / self.batch_size)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slide"] = None
        return state

    def __getitem__(self, i: int):
        t0 = time.perf_counter()
        if self._slide is None:
            self._slide = open_slide(self.slide_path, mpp=self.mpp, backend=self.backend)
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.patch_l0_xy))
        out = np.empty((hi - lo, self.patch_px, self.patch_px, 3), np.uint8)
        size = (self.patch_px, self.patch_px)
        for j, (x, y) in enumerate(self.patch_l0_xy[lo:hi]):
            out[j] = self._slide.read_at_mpp((x, y), size, self.spacing_um_px)
        return torch.from_numpy(out), torch.arange(lo, hi), time.perf_counter() - t0


@dataclass
class InferenceResult:
    """Class probabilities per patch (grid order) and where the time went."""

    probs: np.ndarray  # float32 (N, num_classes)
    device: str
    precision: str
    n_patches: int
    seconds_total: float
    seconds_read: float  # summed over reader processes (CPU-seconds of reading + decoding)
    seconds_wait: float  # main process waiting for batches (reading not hidden behind the model)
    seconds_model: float  # preprocessing + forward + softmax, device-synchronised
    workers: int
    batch_size: int
    extra: dict = field(default_factory=dict)

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds_total if self.seconds_total > 0 else float("nan")

    def timings(self) -> dict:
        return {
            "device": self.device, "precision": self.precision, "workers": self.workers,
            "batch_size": self.batch_size, "n_patches": self.n_patches,
            "seconds_total": round(self.seconds_total, 4), "seconds_read_cpu": round(self.seconds_read, 4),
            "seconds_wait_for_reads": round(self.seconds_wait, 4), "seconds_model": round(self.seconds_model, 4),
            "patches_per_s": round(self.patches_per_s, 2),
        }


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def run_inference(
    slide_path: str | Path,
    patch_l0_xy: np.ndarray,
    package: ModelPackage,
    *,
    config: InferenceConfig = InferenceConfig(),
    mpp: float | None = None,
    backend: str = "auto",
    desc: str = "patches",
) -> InferenceResult:
    """Predict every patch whose level-0 top-left is in ``patch_l0_xy`` (float (N, 2)).

    Patches are ``package.config.patch_size_pixels`` px at ``package.config.spacing_um_px``.
    Returns class probabilities (softmax; sigmoid for a one-output model) in input order.
    """
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = _autocast_dtype(device, config.precision)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    cfg = package.config
    n = len(patch_l0_xy)
    model = package.model.to(device).eval()
    preprocess = Preprocess(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    workers = config.n_workers() if n > config.batch_size else 0
    dataset = PatchBatches(slide_path, patch_l0_xy, patch_px=cfg.patch_size_pixels, spacing_um_px=cfg.spacing_um_px,
                           batch_size=config.batch_size, mpp=mpp, backend=backend)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    probs = np.zeros((n, cfg.num_classes if cfg.num_classes > 1 else 1), np.float32)
    read_s = wait_s = model_s = 0.0
    bar = tqdm(total=n, desc=desc, unit="patch", disable=not config.progress or None, leave=False)
    t_wait = time.perf_counter()
    with torch.inference_mode():
        for patches, index, seconds in loader:
            wait_s += time.perf_counter() - t_wait
            read_s += float(seconds)
            t0 = time.perf_counter()
            x = patches.to(device, non_blocking=True)
            x = preprocess(x)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if amp_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=amp_dtype):
                    logits = model(x)
            else:
                logits = model(x)
            p = _probabilities(logits).cpu().numpy()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_s += time.perf_counter() - t0
            probs[index.numpy()] = p
            bar.update(len(index))
            t_wait = time.perf_counter()
    bar.close()
    return InferenceResult(
        probs=probs, device=str(device), precision=precision, n_patches=n,
        seconds_total=time.perf_counter() - t_start, seconds_read=read_s, seconds_wait=wait_s,
        seconds_model=model_s, workers=workers, batch_size=config.batch_size,
    )
