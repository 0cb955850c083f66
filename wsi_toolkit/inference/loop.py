"""The prediction loop: patches read in blocks (:mod:`.reading`), re-batched, predicted on the device.

Batches go to the device as uint8 (4x less than float), pinned on CUDA; resizing and
normalisation run on the device (:class:`wsi_toolkit.model_package.Preprocess`). The model is the
package's torch model or, on a CPU, OpenVINO's compilation of it (:mod:`wsi_toolkit.runtime`).
Logits become probabilities by :func:`wsi_toolkit.model_package.logits.probabilities`, re-exported here,
at the package's temperature (:attr:`~wsi_toolkit.model_package.ModelConfig.temperature`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from wsi_toolkit.errors import ConfigError, ModelPackageError
from wsi_toolkit.inference.device import (
    CPU_BATCH_SIZE,
    autocast_dtype,
    cuda_batch_size,
    prepare_model,
    resolve_device,
)
from wsi_toolkit.inference.mc_dropout import MC_DROPOUT_MIN_SAMPLES, McDropoutModel, split_for_mc_dropout
from wsi_toolkit.inference.reading import PatchBlocks, plan_blocks, single_patch_blocks
from wsi_toolkit.inference.tta import TTA_MODES, TtaMode, combine_views, make_views, n_views
from wsi_toolkit.limits import check_int
from wsi_toolkit.model_package.logits import probabilities
from wsi_toolkit.model_package.preprocess import Preprocess
from wsi_toolkit.runtime import select_runtime
from wsi_toolkit.runtime.names import PRECISIONS, RUNTIMES, Precision
from wsi_toolkit.slide import READ_FROM, ReadFrom
from wsi_toolkit.tiling import PatchGrid

if TYPE_CHECKING:
    from wsi_toolkit.model_package import ModelPackage

__all__ = ["InferenceConfig", "InferenceResult", "probabilities", "run_inference"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceConfig:
    """How patches are read and predicted.

    ``workers`` is the number of reader threads (0 = read in the calling thread, between forward
    passes); ``None`` picks ``min(4, cpu_count - 1)`` on a GPU and on the CPU one (none on a
    1-core machine): one reader keeps ahead of the network on a CPU, and more readers would only
    take cores from the model's threads (measured in BENCHMARKS.md, "Patch reader").
    ``precision="auto"``: on CUDA bf16 autocast where supported, else fp16 (mixed precision, as
    everyone runs a GPU); fp32 on a CPU and on MPS, so the same slide, package and settings give
    the same heatmap on every CPU (AVX2-only or AVX512-BF16/AMX alike). ``bf16`` on a CPU is
    opt-in: fast where the CPU has native bf16 (:func:`~.device.cpu_has_fast_bf16`), emulated and
    slow elsewhere, and it moves probabilities by up to ~1e-2 (BENCHMARKS.md).
    ``optimize``: on CPU, freeze a TorchScript model and fuse it with oneDNN Graph (fp32) or apply
    ``optimize_for_inference`` (bf16), see :class:`~.device.CpuGraph`; results differ from the
    plain model by float rounding.
    ``block_px``, ``block_patches``: patches are cut from region reads up to ``block_px`` model px
    on a side holding up to ``block_patches`` patches (blocks of ``min((block_px - patch_px) //
    stride_px + 1, isqrt(block_patches))`` cells a side, at least one), see
    :func:`~.reading.plan_blocks`. Large regions spread the per-read cost; the patch cap keeps the
    patches cut from one region (27 kB each at 96 px) in cache: at stride 96 that is 16 x 16 cells
    (1536 px), at stride 32 22 x 22 (768 px, BENCHMARKS.md); ``block_cells`` sets the number of
    cells directly instead.
    ``runtime``: ``"auto"`` runs the model with OpenVINO on a CPU where it is installed (its fp32
    agrees with torch within 1e-4, checked when the model is converted) for runs of at least two
    batches (fewer patches run on torch: compiling would take longer), torch elsewhere;
    ``"torch"``, ``"openvino"`` force one (:func:`wsi_toolkit.runtime.select_runtime`).
    ``precision="int8"`` (OpenVINO only) quantizes the model, calibrated on ``calibration`` (a PCam
    folder or an ``.npy`` of patches, :func:`~wsi_toolkit.runtime.load_calibration`), by default on
    tissue of the slide being analysed. ``cache_dir``: converted models (default
    :func:`~wsi_toolkit.runtime.default_cache_dir`). ``ov_requests``: OpenVINO infer requests in
    flight: 1 runs one batch at a time with every thread on it (LATENCY hint); ``None`` compiles with
    the THROUGHPUT hint and keeps its optimal number of requests running asynchronously while the
    next batches are read and preprocessed; a number N > 1 keeps N requests in flight on those streams. Probabilities
    are the same either way (each batch is computed alone). ``ov_preprocess``: ``graph`` puts the
    package's preprocessing into OpenVINO's compiled graph (PrePostProcessor; the uint8 patches go
    in as read) where it does what torch does, ``torch`` runs :class:`Preprocess` before the model;
    fp32 probabilities agree within 1e-4 (3e-5 measured on real patches).
    ``read_from``: which pyramid level the patches are read from (:data:`wsi_toolkit.slide.ReadFrom`):
    ``nearest`` the level nearest the model's um/px, ``finer`` a level at least 2x finer shrunk with an
    area-averaging filter, ``level0`` level 0 (as WSInfer); ``finer`` and ``level0`` hand a model whose
    package resizes its input twice the pixels from a finer level, so its Resize makes the input in one
    step. It changes the pixels the model sees. The default, ``finer``, was chosen by measurement on
    real-tissue mosaic slides (at least as accurate as WSInfer on every one; ``nearest`` 2-3 points
    less accurate on 40x and 20x JPEG slides) at ~20% of the speed (docs/frames.md, BENCHMARKS.md).
    ``tta``: test-time augmentation (:mod:`~.tta`): ``"none"``, ``"flips"`` (4 views) or
    ``"dihedral"`` (8 views); each patch's probabilities are the mean over its views and
    :attr:`InferenceResult.probs_std` their spread. The slide is read once: each batch of
    ``batch_size // views`` patches (at least 1) goes to the model as one batch of all its views,
    so the model still sees about ``batch_size`` patches per forward pass.
    ``mc_dropout``: Monte-Carlo dropout samples per patch (0: off; at least 2; :mod:`~.mc_dropout`):
    the package's body runs once per patch and its head ``mc_dropout`` times with its ``Dropout``
    layers sampled (BatchNorm stays in eval mode), masks seeded by ``mc_dropout_seed`` and the patch's
    index; ``probs`` is the mean over the samples and :attr:`InferenceResult.probs_std` their spread,
    as with TTA, but each sample at the package's temperature (measured, see :func:`run_inference`).
    Needs a fastai ``Sequential(body, head)`` model with head dropout, runs on torch (``runtime``
    ``auto`` picks it; ``openvino`` and ``int8`` are refused) and not together with ``tta``. Batches
    are ``batch_size`` patches through the body.
    """

    batch_size: int | Literal["auto"] = "auto"
    workers: int | None = None
    device: str = "auto"
    precision: Precision = "auto"
    progress: bool = True
    block_cells: int | None = None
    block_px: int = 1536
    block_patches: int = 512
    optimize: bool = True
    runtime: str = "auto"
    cache_dir: str | None = None
    calibration: str | None = None
    ov_requests: int | None = 1
    ov_preprocess: Literal["graph", "torch"] = "graph"
    read_from: ReadFrom = "finer"
    tta: TtaMode = "none"
    mc_dropout: int = 0
    mc_dropout_seed: int = 0

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ConfigError(f"tta must be {', '.join(TTA_MODES)}; got {self.tta!r}")
        check_int(self.mc_dropout_seed, "mc_dropout_seed", minimum=0)
        if self.mc_dropout:
            check_int(self.mc_dropout, f"mc_dropout (0: off, else samples >= {MC_DROPOUT_MIN_SAMPLES})",
                      minimum=MC_DROPOUT_MIN_SAMPLES)
            if self.tta != "none":
                raise ConfigError(f"choose one uncertainty method: mc_dropout {self.mc_dropout} or tta {self.tta}, "
                                  "not both")
            if self.runtime == "openvino" or self.precision == "int8":
                raise ConfigError("MC-dropout runs on the torch runtime: use --runtime torch "
                                  f"(got runtime {self.runtime}, precision {self.precision})")
        if self.batch_size != "auto":
            check_int(self.batch_size, "batch_size (a number or 'auto')")
        if self.workers is not None:
            check_int(self.workers, "workers", minimum=0)
        if self.block_cells is not None:
            check_int(self.block_cells, "block_cells")
        if self.ov_requests is not None:
            check_int(self.ov_requests, "ov_requests")
        if self.ov_preprocess not in ("graph", "torch"):
            raise ConfigError(f"ov_preprocess must be graph or torch; got {self.ov_preprocess!r}")
        if self.read_from not in READ_FROM:
            raise ConfigError(f"read_from must be one of {', '.join(READ_FROM)}; got {self.read_from!r}")
        check_int(self.block_px, "block_px")
        check_int(self.block_patches, "block_patches")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be {', '.join(RUNTIMES)}; got {self.runtime!r}")
        if self.precision == "int8" and self.runtime == "torch":
            raise ConfigError("precision int8 runs on OpenVINO: use runtime openvino (or auto)")
        if self.calibration is not None and not Path(self.calibration).exists():
            raise ConfigError(f"calibration {self.calibration} does not exist; give a PCam folder")
        resolve_device(self.device)  # validates

    def cells_per_block(self, *, patch_px: int, stride_px: int) -> int:
        """``block_cells``, or the cells a side whose patches fill at most ``block_px`` px and
        number at most ``block_patches``."""
        if self.block_cells is not None:
            return self.block_cells
        return max(1, min((self.block_px - patch_px) // stride_px + 1, math.isqrt(self.block_patches)))

    def nominal_batch_size(self) -> int:
        """``batch_size``, or for ``"auto"`` the CPU choice (:data:`~.device.CPU_BATCH_SIZE`); on CUDA
        ``"auto"`` is settled by :func:`~.device.cuda_batch_size` once the model is on the device."""
        return CPU_BATCH_SIZE if self.batch_size == "auto" else self.batch_size

    def n_workers(self, device: torch.device | None = None) -> int:
        """Reader threads: ``workers``, or the default for ``device`` (see the class docstring)."""
        if self.workers is not None:
            return self.workers
        spare = max(0, (os.cpu_count() or 1) - 1)
        if device is not None and device.type == "cpu":
            return min(1, spare)
        return min(4, spare)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InferenceResult:
    """Class probabilities per patch (patch order) and where the time went. With test-time
    augmentation ``probs`` is the mean over the views and ``probs_std`` their standard deviation
    (float32 (N, num_classes)); with MC-dropout the same over the dropout samples; None without."""

    probs: np.ndarray  # float32 (N, num_classes)
    device: str
    precision: str
    n_patches: int
    seconds_total: float
    seconds_read: float  # summed over reads (reading, decoding and cutting patches; threads overlap)
    seconds_wait: float  # the loop waiting for patches (reading not hidden behind the model)
    seconds_model: float  # preprocessing + forward + softmax, device-synchronised
    workers: int
    batch_size: int
    extra: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # which runtime ran and what it changed (run.json "runtime")
    probs_std: np.ndarray | None = None  # float32 (N, num_classes): spread over the TTA views / MC-dropout samples

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds_total if self.seconds_total > 0 else float("nan")

    def timings(self) -> dict:
        return {
            "device": self.device, "precision": self.precision, "workers": self.workers,
            "batch_size": self.batch_size, "n_patches": self.n_patches,
            "seconds_total": round(self.seconds_total, 4), "seconds_read_cpu": round(self.seconds_read, 4),
            "seconds_wait_for_reads": round(self.seconds_wait, 4), "seconds_model": round(self.seconds_model, 4),
            "patches_per_s": round(self.patches_per_s, 2), **self.extra,
        }


def _check_logits(logits, n: int, num_classes: int, package_path) -> None:
    """The model's output for a batch of ``n`` must be ``(n, num_classes)`` logits (``(n,)`` for a
    one-output model); otherwise a :class:`ModelPackageError` naming the package."""
    if not isinstance(logits, torch.Tensor):
        raise ModelPackageError(f"the model returned a {type(logits).__name__} for a batch of {n} patches; "
                                "it must return one tensor of logits", source=package_path)
    shape = tuple(logits.shape)
    if not (shape == (n, num_classes) or (num_classes == 1 and shape == (n,))):
        want = f"({n}, {num_classes})" + (f" or ({n},)" if num_classes == 1 else "")
        raise ModelPackageError(
            f"the model returned logits of shape {shape} for a batch of {n} patches; config.json says "
            f"{num_classes} class(es), so {want} was expected (it passed the load check on a batch of 1: "
            "check how the model handles the batch dimension)", source=package_path)


def _last_line(exc: BaseException) -> str:
    """The last non-empty line of a (possibly multi-line, e.g. TorchScript) exception message:
    where the error itself is said, after any traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def run_inference(
    slide_path: str | Path,
    patches: PatchGrid | np.ndarray,
    package: ModelPackage,
    *,
    config: InferenceConfig = InferenceConfig(),
    mpp: float | None = None,
    backend: str = "auto",
    desc: str = "patches",
) -> InferenceResult:
    """Predict every patch of ``patches``: a :class:`PatchGrid` (read in shared regions, see
    :func:`~.reading.plan_blocks`) or level-0 top-left corners, float (N, 2) (each patch read alone).

    Patches are ``package.config.patch_size_pixels`` px at ``package.config.spacing_um_px``
    (a grid must have been made with that patch size and spacing). Returns class probabilities
    (:func:`probabilities`, at the package's temperature; with TTA the views' mean at temperature 1, see
    ``temperature`` below; with MC-dropout the samples' mean, each at the package's temperature) in the
    patches' order; the reader thread
    count does not change them. With ``config.tta`` each patch is predicted in every view (:mod:`~.tta`),
    read once.
    """
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    cfg = package.config
    if isinstance(patches, PatchGrid):
        if (patches.config.patch_px, patches.config.spacing_um_px) != (cfg.patch_size_pixels, cfg.spacing_um_px):
            raise ConfigError(
                f"grid of {patches.config.patch_px} px at {patches.config.spacing_um_px} um/px does not match the "
                f"model's {cfg.patch_size_pixels} px at {cfg.spacing_um_px} um/px")
        blocks = plan_blocks(patches, block_cells=config.cells_per_block(
            patch_px=patches.config.patch_px, stride_px=patches.config.stride_px))
        n = len(patches)
    else:
        blocks = single_patch_blocks(patches, cfg.patch_size_pixels)
        n = len(blocks)
    mc_samples = config.mc_dropout
    # views: probabilities per patch (TTA views or MC-dropout samples); per_patch: patches the body sees per patch
    views = mc_samples or n_views(config.tta)
    per_patch = 1 if mc_samples else views
    large = n * per_patch >= 2 * config.nominal_batch_size()
    runtime = "torch" if config.runtime == "auto" and (mc_samples or not large) and config.precision != "int8" \
        else config.runtime

    def calibration():  # automatic: drawn only when the cache has no calibrated graph of this package
        from wsi_toolkit.runtime import calibration_from_slides

        return calibration_from_slides([slide_path], package, mpp=mpp, backend=backend, read_from=config.read_from)

    t_setup = time.perf_counter()
    given = None
    if config.calibration is not None and config.precision == "int8":
        from wsi_toolkit.runtime import load_calibration

        given = load_calibration(config.calibration)
    # read_from finer/level0 hands a resizing model twice the pixels from a finer level (PatchBlocks): its
    # Resize then runs in torch (an OpenVINO graph with the preprocessing inside takes patch_px patches).
    oversample_ok = any(step.name == "Resize" and step.size is not None for step in cfg.transform)
    ov_preprocess = "torch" if oversample_ok and config.read_from != "nearest" else config.ov_preprocess
    choice = select_runtime(package, runtime=runtime, precision=config.precision, device=device,
                            cache_dir=config.cache_dir, calibration=calibration if given is None else given,
                            requests=config.ov_requests, preprocess=ov_preprocess)
    model: Any
    mc: McDropoutModel | None = None
    if choice.model is not None:
        model, amp_dtype, precision = choice.model, None, choice.precision
    else:
        amp_dtype = autocast_dtype(device, choice.precision)  # type: ignore[arg-type]
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        source = package.model
        if mc_samples:
            # a model.pt2 graph was exported in eval mode without its dropouts: sample the TorchScript's head
            if package.format == "torch.export":
                source = package.load_torchscript()
            mc = split_for_mc_dropout(source.to(device).eval(), samples=mc_samples, seed=config.mc_dropout_seed,
                                      input_size=cfg.input_size, source=package.path)
            source = mc.body
        model = prepare_model(source, device, amp_dtype=amp_dtype, optimize=config.optimize and large)
        if mc is not None:
            mc.body = model  # the body's (optimised) graph, run once per patch; the head stays eager
    # OpenVINO with the preprocessing in its graph takes the uint8 patches as they are read.
    preprocess: Any = (lambda b: b) if getattr(model, "takes_uint8", False) else Preprocess(cfg).to(device)
    seconds_setup = time.perf_counter() - t_setup
    batch_size = config.nominal_batch_size()
    if config.batch_size == "auto" and device.type == "cuda" and n > batch_size:
        batch_size = cuda_batch_size(model, preprocess, device, amp_dtype, cfg.patch_size_pixels)
        log.info("batch size %d (auto: fills half the free GPU memory, at most 1024)", batch_size)
    workers = config.n_workers(device) if n * per_patch > config.nominal_batch_size() else 0
    read_batch = max(1, batch_size // per_patch)  # patches per forward pass, each in all its views
    reader = PatchBlocks(slide_path, blocks, patch_px=cfg.patch_size_pixels, spacing_um_px=cfg.spacing_um_px,
                         mpp=mpp, backend=backend, read_from=config.read_from, oversample_ok=oversample_ok)
    probs = np.zeros((n, cfg.num_classes if cfg.num_classes > 1 else 1), np.float32)
    probs_std = np.zeros_like(probs) if views > 1 else None

    def store(p: np.ndarray, index: torch.Tensor) -> None:
        """Probabilities of a view-major batch of the patches ``index`` into ``probs``/``probs_std``."""
        mean, std = combine_views(p, views)
        i = index.numpy()
        probs[i] = mean
        if probs_std is not None:
            probs_std[i] = std
    # The package's temperature was fitted on single-view logits: applied to each of the TTA views it
    # over-softens their mean, which averaging already calibrates (real patches: test ECE 0.044 at T = 1
    # vs 0.074 at T, docs/validation.md). So a TTA run averages the views at T = 1. MC-dropout samples
    # (the head alone varies) keep the package's T: on the valid split it lowers their mean's ECE and NLL
    # (ECE 0.061 -> 0.054 at K = 8, 0.056 -> 0.041 at K = 32; docs/validation.md, "MC-dropout against TTA").
    temperature = cfg.temperature if views == 1 or mc_samples else 1.0
    read_s = wait_s = model_s = 0.0
    bar = tqdm(total=n, desc=desc, unit="patch", disable=not config.progress or None, leave=False)

    def predict(batch: torch.Tensor, index: torch.Tensor) -> float:
        t0 = time.perf_counter()
        if device.type == "cuda":
            batch = batch.pin_memory()
        x = preprocess(make_views(batch.to(device, non_blocking=True), config.tta))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        forward = model if mc is None else (lambda b: mc(b, index))
        try:
            if amp_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=amp_dtype):
                    logits = forward(x)
            else:
                logits = forward(x)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one clear line instead of a TorchScript traceback
            raise ModelPackageError(
                f"the model fails on a batch of {len(index) * views} patches "
                f"({type(exc).__name__}: {_last_line(exc)}); "
                "it passed the load check on one zero patch: check how it handles the batch dimension and "
                "real pixels, or try --batch-size 1",
                source=package.path) from None
        _check_logits(logits, len(index) * views, cfg.num_classes, package.path)
        p = probabilities(logits, temperature).cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        store(p, index)
        bar.update(len(index))
        return time.perf_counter() - t0

    pipelined: Any = contextlib.nullcontext(None)
    if getattr(model, "n_requests", 1) > 1:
        lock = threading.Lock()

        def on_logits(logits: torch.Tensor, index: torch.Tensor) -> None:  # OpenVINO's threads
            _check_logits(logits, len(index) * views, cfg.num_classes, package.path)
            p = probabilities(logits, temperature).numpy()
            with lock:
                store(p, index)
                bar.update(len(index))

        pipelined = model.pipelined(on_logits)

    def predict_async(batch: torch.Tensor, index: torch.Tensor) -> float:
        t0 = time.perf_counter()
        assert submit is not None
        submit(preprocess(make_views(batch, config.tta)), index)  # waits only while every request is busy
        return time.perf_counter() - t0

    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    n_pending = 0
    # closing(): on an error the reader threads stop and the slide closes now, not when the
    # traceback (which holds this frame) is freed.
    with torch.inference_mode(), model, contextlib.closing(reader.read(workers)) as items, pipelined as submit:
        if submit is not None:
            predict = predict_async  # noqa: F811 - the asynchronous path replaces the plain one
        t_wait = time.perf_counter()
        for patches_u8, index, seconds in items:
            wait_s += time.perf_counter() - t_wait
            read_s += seconds
            pending.append((torch.from_numpy(patches_u8), torch.from_numpy(index)))
            n_pending += len(index)
            # Blocks vary in size: re-batch to exactly read_batch patches (x views) per forward pass.
            while n_pending >= read_batch:
                batch, idx = torch.cat([b for b, _ in pending]), torch.cat([i for _, i in pending])
                model_s += predict(batch[:read_batch], idx[:read_batch])
                rest = (batch[read_batch:], idx[read_batch:])
                pending, n_pending = ([rest] if len(rest[1]) else []), len(rest[1])
            t_wait = time.perf_counter()
        if n_pending:
            model_s += predict(torch.cat([b for b, _ in pending]), torch.cat([i for _, i in pending]))
        t_drain = time.perf_counter()
    model_s += time.perf_counter() - t_drain  # the asynchronous path: the last batches finishing
    bar.close()
    return InferenceResult(
        probs=probs, device=str(device), precision=precision, n_patches=n,
        seconds_total=time.perf_counter() - t_start, seconds_read=read_s, seconds_wait=wait_s,
        seconds_model=model_s, workers=workers, batch_size=read_batch * per_patch,
        extra={"n_regions": len(blocks), "read_level": reader.level, "read_oversample": reader.oversample,
               "temperature_applied": temperature,
               **({"tta": config.tta, "tta_views": views} if config.tta != "none" else {}),
               **({"mc_dropout_samples": mc_samples, "mc_dropout_seed": config.mc_dropout_seed,
                   "mc_dropout_p": mc.dropout_ps} if mc is not None else {}),
               "model_path": model.path, "seconds_model_setup": round(seconds_setup, 4),
               **{f"runtime_{k}": v for k, v in choice.stats.items()}},
        runtime={**choice.info, "precision": precision}, probs_std=probs_std,
    )
