"""Batched patch reading and prediction over a patch grid.

Reading is the bottleneck of slide inference, so it runs in DataLoader worker processes, each
with its own slide handle, reading at the model's um/px through
:meth:`wsi_toolkit.slide.SlideReader.read_at_mpp` (the pyramid level closest to the model,
never level 0 for a ~1 um/px model). Workers read regions of many patches (each pixel decoded
once, each worker sweeping its own band of the slide) and send the region, not its patches;
patches are cut in the main process. Batches go to the device as uint8 (4x less than float),
pinned on CUDA; resizing and normalisation run on the device
(:class:`wsi_toolkit.model_package.Preprocess`). On CUDA the model runs under autocast (bf16
where supported, else fp16) in channels_last; on the CPU see :class:`_CpuGraph`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from wsi_toolkit.errors import ConfigError, ModelPackageError, SlideReadError
from wsi_toolkit.model_package import ModelPackage, Preprocess, quiet_torchscript_deprecation
from wsi_toolkit.slide import open_slide
from wsi_toolkit.tiling import PatchGrid

__all__ = ["CPU_BATCH_SIZE", "InferenceConfig", "InferenceResult", "PatchBlocks", "batch_for_memory",
           "cuda_batch_size", "cut_patches", "keep_numpy", "plan_blocks", "resolve_device", "run_inference",
           "worker_order"]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]

#: ``batch_size="auto"`` off CUDA: ResNet50 at 96 px on a 2-core AVX2 CPU runs 64 p/s at 32,
#: 80 at 64 and 61 at 128 (larger batches leave the caches), see BENCHMARKS.md.
CPU_BATCH_SIZE = 64


@dataclass(frozen=True)
class InferenceConfig:
    """How patches are read and predicted.

    ``workers=None`` picks the reader processes (0 = read in this process): ``min(4, cpu_count - 1)``
    on a GPU; on the CPU one (none on a 1-core machine), since one reader delivers ~9,000 patches/s
    at stride 96 and ~70,000 at stride 32 (BENCHMARKS.md), far above what the network does on a
    CPU, and more readers would only take cores from the model's threads.
    ``precision="auto"``: on CUDA bf16 autocast where supported, else fp16 (mixed precision, as
    everyone runs a GPU); fp32 on a CPU and on MPS, so the same slide, package and settings give
    the same heatmap on every CPU (AVX2-only or AVX512-BF16/AMX alike). ``bf16`` on a CPU is
    opt-in: fast where the CPU has native bf16 (:func:`cpu_has_fast_bf16`), emulated and slow
    elsewhere, and it moves probabilities by up to ~1e-2 (BENCHMARKS.md).
    ``optimize``: on CPU, freeze a TorchScript model and fuse it with oneDNN Graph (fp32) or apply
    ``optimize_for_inference`` (bf16), see :class:`_CpuGraph`; results differ from the plain model
    by float rounding.
    ``block_px``, ``block_patches``: patches are cut from region reads up to ``block_px`` model px
    on a side holding up to ``block_patches`` patches (blocks of ``min((block_px - patch_px) //
    stride_px + 1, isqrt(block_patches))`` cells a side, at least one), see :func:`plan_blocks`.
    Large regions spread the per-read cost (~1 ms to hand a region from a worker to the main
    process); the patch cap keeps the patches cut from one region (27 kB each at 96 px) in cache:
    at stride 96 that is 16 x 16 cells (1536 px), at stride 32 22 x 22 (768 px, BENCHMARKS.md);
    ``block_cells`` sets the number of cells directly instead.
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

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                              and self.batch_size > 0):
            raise ConfigError(f"batch_size must be a positive integer or 'auto'; got {self.batch_size!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ConfigError(f"workers must be a non-negative integer; got {self.workers!r}")
        if self.block_cells is not None and not (isinstance(self.block_cells, int) and self.block_cells > 0):
            raise ConfigError(f"block_cells must be a positive integer or None; got {self.block_cells!r}")
        if not (isinstance(self.block_px, int) and self.block_px > 0):
            raise ConfigError(f"block_px must be a positive integer; got {self.block_px!r}")
        if not (isinstance(self.block_patches, int) and self.block_patches > 0):
            raise ConfigError(f"block_patches must be a positive integer; got {self.block_patches!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16; got {self.precision!r}")
        resolve_device(self.device)  # validates

    def cells_per_block(self, *, patch_px: int, stride_px: int) -> int:
        """``block_cells``, or the cells a side whose patches fill at most ``block_px`` px and
        number at most ``block_patches``."""
        if self.block_cells is not None:
            return self.block_cells
        return max(1, min((self.block_px - patch_px) // stride_px + 1, math.isqrt(self.block_patches)))

    def nominal_batch_size(self) -> int:
        """``batch_size``, or for ``"auto"`` the CPU choice (:data:`CPU_BATCH_SIZE`); on CUDA
        ``"auto"`` is settled by :func:`cuda_batch_size` once the model is on the device."""
        return CPU_BATCH_SIZE if self.batch_size == "auto" else self.batch_size

    def n_workers(self, device: torch.device | None = None) -> int:
        if self.workers is not None:
            return self.workers
        spare = max(0, (os.cpu_count() or 1) - 1)
        if device is not None and device.type == "cpu":
            return min(1, spare)
        return min(4, spare)

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


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast
    speeds up convolutions; elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "auto" and device.type != "cuda":
        return None  # CPU and MPS: fp32 unless asked, so results do not depend on the CPU model
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto on CUDA
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class _Block:
    """Patches read from one region: indices into the patch list, offsets in model px."""

    index: np.ndarray  # int64 (n,)
    region_l0_xy: tuple[float, float]  # top-left of the region in level-0 px
    region_px: tuple[int, int]  # (w, h) in model px
    offsets_px: np.ndarray  # int64 (n, 2): (x, y) of each patch inside the region


def plan_blocks(grid: PatchGrid, *, block_cells: int = 8) -> list[_Block]:
    """Group the grid's patches into blocks of up to ``block_cells`` x ``block_cells`` cells.

    Each block is read as ONE region at the model's um/px covering its patches' bounding box;
    patches are then cut from it in memory at integer offsets (``stride_px`` apart), so pixels
    shared by overlapping patches (9 patches each at PCam stride 32) are read and decoded once.
    The lattice makes this exact: patch (r, c) starts at ``(c * stride - offset) * l0_per_px``.
    Blocks are in row-major block order; patches keep grid order within a block.
    """
    cfg = grid.config
    rc = grid.grid_rc
    if len(rc) == 0:
        return []
    keys = (rc[:, 0] // block_cells) * (int(rc[:, 1].max()) // block_cells + 1) + rc[:, 1] // block_cells
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    blocks = []
    for idx in np.split(order, bounds):
        sub = rc[idx]
        r0, c0 = sub.min(axis=0)
        r1, c1 = sub.max(axis=0)
        region_l0_xy = tuple(float(v) for v in grid.patch_l0_xy(np.array([[r0, c0]]))[0])
        region_px = (int((c1 - c0) * cfg.stride_px + cfg.patch_px), int((r1 - r0) * cfg.stride_px + cfg.patch_px))
        offsets = np.column_stack([(sub[:, 1] - c0) * cfg.stride_px, (sub[:, 0] - r0) * cfg.stride_px]).astype(np.int64)
        blocks.append(_Block(idx.astype(np.int64), region_l0_xy, region_px, offsets))
    return blocks


def worker_order(n: int, workers: int) -> np.ndarray:
    """A permutation of ``range(n)`` that gives each DataLoader worker a contiguous run of items.

    A map-style DataLoader hands item ``i`` to worker ``i % workers``; with blocks in row-major
    order that interleaves neighbours between workers, and each worker then decodes the tiles its
    neighbour's blocks share with its own. Item ``i`` here is element ``i // workers`` of chunk
    ``i % workers`` of the row-major order, so worker ``w`` sweeps chunk ``w`` (a band of the slide)
    on its own and finds shared tiles in its tile cache.
    """
    if workers <= 1 or n <= 1:
        return np.arange(n)
    i = np.arange(n)
    w, k = i % workers, i // workers
    sizes = np.array([len(range(v, n, workers)) for v in range(workers)])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts[w] + k


def _single_patch_blocks(patch_l0_xy: np.ndarray, patch_px: int) -> list[_Block]:
    xy = np.asarray(patch_l0_xy, np.float64)
    return [_Block(np.array([i]), (float(x), float(y)), (patch_px, patch_px), np.zeros((1, 2), np.int64))
            for i, (x, y) in enumerate(xy)]


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm (where torch puts shared memory on Linux), or None elsewhere."""
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


class _ReadFailure:
    """What a reader process sends instead of a region when reading it raised: the original
    exception, re-raised as it is in the main process (so its message is the same one line as
    with ``workers=0``, not the DataLoader's "Caught ... in DataLoader worker process" traceback).
    An exception that cannot be pickled travels as a :class:`SlideReadError` with its message."""

    def __init__(self, exc: BaseException, slide_path: str):
        try:
            self.payload = pickle.dumps(exc)
            pickle.loads(self.payload)
        except Exception:  # noqa: BLE001 - an exception type that does not round-trip
            self.payload = pickle.dumps(SlideReadError(f"{slide_path}: {type(exc).__name__}: {_first_line(exc)}"))

    def reraise(self):
        raise pickle.loads(self.payload) from None


def _first_line(exc: BaseException) -> str:
    """The last non-empty line of a (possibly multi-line, e.g. TorchScript) exception message:
    where the error itself is said, after any traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def keep_numpy(item):
    """DataLoader ``collate_fn`` that leaves items as they are (small numpy arrays and tuples),
    instead of turning them into shared-memory tensors (one file descriptor, mmap and page faults
    per tensor: 3x slower reading at stride 32 than pickling them through the worker's pipe)."""
    return item


class PatchBlocks(torch.utils.data.Dataset):
    """Dataset whose item ``i`` is block ``i``: (region, patch indices (n,), patch offsets (n, 2)
    in the region, read seconds). Load it with :meth:`loader`; :meth:`region` turns the first
    field into the uint8 (H, W, 3) region and :func:`cut_patches` cuts the patches.

    Each worker opens its own slide handle on first use (handles are not shared across processes),
    with a tile cache sized to hold a few rows of the level it reads
    (:meth:`~wsi_toolkit.slide.SlideReader.reserve_tile_cache`). Regions go to the main process
    through a ring of shared-memory slots per worker, made before the workers start: the worker
    copies the region into its next slot and sends only (worker, slot, h, w); nothing is pickled,
    piped or mapped per item. A DataLoader keeps at most ``prefetch_factor`` items in flight per
    worker and hands out the next index before returning an item, so ``prefetch_factor + 2``
    slots per worker are never overwritten while the main process still cuts from them.
    """

    def __init__(self, slide_path: str | Path, blocks: list[_Block], *, patch_px: int, spacing_um_px: float,
                 mpp: float | None = None, backend: str = "auto"):
        self.slide_path = str(slide_path)
        self.blocks = blocks
        self.patch_px = int(patch_px)
        self.spacing_um_px = float(spacing_um_px)
        self.mpp = mpp
        self.backend = backend
        self._slide = None
        self._slots: torch.Tensor | None = None  # (workers, slots, max_h, max_w, 3) uint8, shared
        self._served = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def loader(self, workers: int, *, prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
        """A DataLoader over the blocks in this order with ``workers`` reader processes (0: read
        in this process), shared-memory slots made for them."""
        self._slots = None
        if workers > 0 and self.blocks:
            max_w = max(b.region_px[0] for b in self.blocks)
            max_h = max(b.region_px[1] for b in self.blocks)
            shape = (workers, prefetch_factor + 2, max_h, max_w, 3)
            need = math.prod(shape)
            free = _shm_free_bytes()
            if free is not None and need > free // 2:
                # Containers often have a 64 MiB /dev/shm: regions are then pickled through the
                # workers' pipes instead (slower, but needs no shared memory).
                log.info("shared-memory slots need %.0f MiB, /dev/shm has %.0f MiB free: regions go "
                         "through pipes (raise the container's --shm-size for faster reading)",
                         need / 2**20, free / 2**20)
            else:
                self._slots = torch.empty(shape, dtype=torch.uint8)
                self._slots.share_memory_()
        return torch.utils.data.DataLoader(
            self, batch_size=None, shuffle=False, num_workers=workers, collate_fn=keep_numpy,
            persistent_workers=False, prefetch_factor=prefetch_factor if workers else None)

    def region(self, field) -> np.ndarray:
        """The region of an item's first field (a view into a shared slot when read by a worker)."""
        if isinstance(field, np.ndarray):
            return field
        worker, slot, h, w = field
        return self._slots[worker, slot, :h, :w].numpy()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slide"] = None
        return state

    def __getitem__(self, i: int):
        if torch.utils.data.get_worker_info() is None:
            return self._read(i)
        try:
            return self._read(i)
        except Exception as exc:  # noqa: BLE001 - relayed to the main process and raised there as it is
            return _ReadFailure(exc, self.slide_path)

    def _read(self, i: int):
        t0 = time.perf_counter()
        if self._slide is None:
            self._slide = open_slide(self.slide_path, mpp=self.mpp, backend=self.backend)
            self._slide.reserve_tile_cache(self.spacing_um_px)
        b = self.blocks[i]
        region = self._slide.read_at_mpp(b.region_l0_xy, b.region_px, self.spacing_um_px)
        # The region travels to the main process, not its patches: at stride 32 the patches hold
        # every pixel 9 times.
        info = torch.utils.data.get_worker_info()
        if info is None or self._slots is None:
            return region, b.index, b.offsets_px, time.perf_counter() - t0
        slot = self._served % self._slots.shape[1]
        self._served += 1
        h, w = region.shape[:2]
        self._slots[info.id, slot, :h, :w].numpy()[...] = region
        return (info.id, slot, h, w), b.index, b.offsets_px, time.perf_counter() - t0


def cut_patches(region: np.ndarray, offsets_px: np.ndarray, patch_px: int) -> np.ndarray:
    """Patches (n, p, p, 3) of ``region`` (H, W, 3) at (x, y) ``offsets_px``, in one gather."""
    h, w, c = region.shape
    offsets_px = np.asarray(offsets_px)
    if len(offsets_px) and ((offsets_px < 0).any() or (offsets_px[:, 0] + patch_px > w).any()
                            or (offsets_px[:, 1] + patch_px > h).any()):
        raise ValueError(f"patch offsets fall outside the {w}x{h} region")
    sy, sx, sc = region.strides
    # windows[y, x] is the (p, p, c) patch at (x, y), channels last: the gather copies rows.
    windows = np.lib.stride_tricks.as_strided(region, (h - patch_px + 1, w - patch_px + 1, patch_px, patch_px, c),
                                              (sy, sx, sy, sx, sc), writeable=False)
    return windows[offsets_px[:, 1], offsets_px[:, 0]]


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
            "patches_per_s": round(self.patches_per_s, 2), **self.extra,
        }


class _CpuGraph:
    """A TorchScript model on the CPU, run through the fastest graph path that works.

    fp32: the frozen graph with oneDNN Graph fusion (``torch.jit.enable_onednn_fusion``): conv +
    batchnorm + add + relu fused into oneDNN partitions, ~15% faster than
    ``optimize_for_inference`` for a ResNet50 on an AVX2 CPU (BENCHMARKS.md). The profiling
    executor compiles the fused graph during the first calls; if that fails (not every graph is
    supported), the model falls back to ``freeze`` + ``optimize_for_inference``, then to the model as
    loaded, and says so in the log. bf16/fp16 autocast: ``optimize_for_inference`` (the fuser does
    not take autocast graphs). The fusion switch is process-wide: :meth:`__exit__` restores it.
    """

    def __init__(self, model: torch.jit.ScriptModule, *, fuse: bool):
        self._plain = model
        self.path = "plain"
        self._fused = None
        self._model: torch.nn.Module = model
        self._fuse = fuse
        self._batch = 0  # largest batch seen: the shape the fused graph was compiled for
        self._was_enabled = torch.jit.onednn_fusion_enabled()

    def __enter__(self) -> "_CpuGraph":
        with quiet_torchscript_deprecation():
            if self._fuse:
                try:
                    torch.jit.enable_onednn_fusion(True)
                    self._fused = torch.jit.freeze(self._plain)
                    self._model, self.path = self._fused, "frozen+onednn-fusion"
                    return self
                except Exception as exc:  # pragma: no cover - depends on the graph
                    log.debug("oneDNN fusion unavailable (%s)", exc)
                    torch.jit.enable_onednn_fusion(self._was_enabled)
            self._use_optimized()
        return self

    def _use_optimized(self) -> None:
        try:
            with quiet_torchscript_deprecation():
                self._model = torch.jit.optimize_for_inference(torch.jit.freeze(self._plain))
            self.path = "frozen+optimize_for_inference"
        except Exception as exc:  # some graphs cannot be frozen; the plain model still works
            log.debug("optimize_for_inference failed (%s); using the model as loaded", exc)
            self._model, self.path = self._plain, "plain"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is None:
            return self._model(x)
        n = x.shape[0]
        # The fused graph is compiled per input shape (~1-2 s each on 2 cores): a short last batch
        # is padded to the size seen first instead (patches are independent in eval mode).
        self._batch = max(self._batch, n)
        if n < self._batch:
            x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        try:
            return self._fused(x)[:n]
        except RuntimeError as exc:
            log.warning("oneDNN-fused graph failed (%s); continuing with optimize_for_inference", exc)
            self._fused = None
            torch.jit.enable_onednn_fusion(self._was_enabled)
            self._use_optimized()
            return self._model(x[:n])

    def __exit__(self, *exc) -> None:
        torch.jit.enable_onednn_fusion(self._was_enabled)


class _Plain:
    """A model used as it is (CUDA, MPS, eager CPU models); same interface as :class:`_CpuGraph`."""

    def __init__(self, model: torch.nn.Module, path: str):
        self._model, self.path = model, path

    def __enter__(self) -> "_Plain":
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(x)

    def __exit__(self, *exc) -> None:
        pass


def _prepare_model(model: torch.nn.Module, device: torch.device, *, optimize: bool,
                   amp_dtype: torch.dtype | None = None) -> _Plain | _CpuGraph:
    """Move to ``device`` in eval mode; channels_last on CUDA; on CPU a TorchScript model goes
    through :class:`_CpuGraph`. Use the result as a context manager around the predictions."""
    model = model.to(device).eval()
    if device.type == "cuda":
        return _Plain(model.to(memory_format=torch.channels_last), "channels_last")
    if optimize and device.type == "cpu" and isinstance(model, torch.jit.ScriptModule):
        return _CpuGraph(model, fuse=amp_dtype is None)
    return _Plain(model, "plain")


def batch_for_memory(per_patch_bytes: float, free_bytes: float, *, start: int = 64, cap: int = 1024,
                     fraction: float = 0.5) -> int:
    """The largest ``start * 2**k <= cap`` whose forward-pass memory (``per_patch_bytes`` each)
    fits in ``fraction`` of ``free_bytes``; ``start`` at least."""
    bs = start
    while bs * 2 <= cap and bs * 2 * per_patch_bytes <= fraction * free_bytes:
        bs *= 2
    return bs


def cuda_batch_size(model, preprocess: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                    patch_px: int, *, probe: int = 64, cap: int = 1024, fraction: float = 0.5) -> int:
    """Batch size that fills the GPU: one forward pass of ``probe`` patches (as inference runs
    them: uint8 -> preprocess -> channels_last -> autocast) measures the memory a patch needs,
    then :func:`batch_for_memory` against the free memory. The probe also warms up cuDNN."""
    x = torch.zeros((probe, patch_px, patch_px, 3), dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        model(preprocess(x).contiguous(memory_format=torch.channels_last))
    torch.cuda.synchronize(device)
    per_patch = max(1.0, (torch.cuda.max_memory_allocated(device) - base) / probe)
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(per_patch, free, start=probe, cap=cap, fraction=fraction)


def _check_logits(logits, n: int, num_classes: int, package_path) -> None:
    """The model's output for a batch of ``n`` must be ``(n, num_classes)`` logits (``(n,)`` for a
    one-output model); otherwise a :class:`ModelPackageError` naming the package."""
    if not isinstance(logits, torch.Tensor):
        raise ModelPackageError(f"the model returned a {type(logits).__name__} for a batch of {n} patches; "
                                "it must return one tensor of logits", source=package_path)
    shape = tuple(logits.shape)
    ok = (shape == (n, num_classes) or (num_classes == 1 and shape == (n,)))
    if not ok:
        want = f"({n}, {num_classes})" + (f" or ({n},)" if num_classes == 1 else "")
        raise ModelPackageError(
            f"the model returned logits of shape {shape} for a batch of {n} patches; config.json says "
            f"{num_classes} class(es), so {want} was expected (it passed the load check on a batch of 1: "
            "check how the model handles the batch dimension)", source=package_path)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


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
    :func:`plan_blocks`) or level-0 top-left corners, float (N, 2) (each patch read alone).

    Patches are ``package.config.patch_size_pixels`` px at ``package.config.spacing_um_px``
    (a grid must have been made with that patch size and spacing). Returns class probabilities
    (softmax; sigmoid for a one-output model) in the patches' order.
    """
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = _autocast_dtype(device, config.precision)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
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
        blocks = _single_patch_blocks(patches, cfg.patch_size_pixels)
        n = len(blocks)
    model = _prepare_model(package.model, device, amp_dtype=amp_dtype,
                           optimize=config.optimize and n >= 2 * config.nominal_batch_size())
    preprocess = Preprocess(cfg).to(device)
    batch_size = config.nominal_batch_size()
    if config.batch_size == "auto" and device.type == "cuda" and n > batch_size:
        batch_size = cuda_batch_size(model, preprocess, device, amp_dtype, cfg.patch_size_pixels)
        log.info("batch size %d (auto: fills half the free GPU memory, at most 1024)", batch_size)
    workers = config.n_workers(device) if n > config.nominal_batch_size() else 0
    blocks = [blocks[i] for i in worker_order(len(blocks), workers)]
    dataset = PatchBlocks(slide_path, blocks, patch_px=cfg.patch_size_pixels, spacing_um_px=cfg.spacing_um_px,
                          mpp=mpp, backend=backend)
    loader = dataset.loader(workers)
    probs = np.zeros((n, cfg.num_classes if cfg.num_classes > 1 else 1), np.float32)
    read_s = wait_s = model_s = cut_s = 0.0
    bar = tqdm(total=n, desc=desc, unit="patch", disable=not config.progress or None, leave=False)
    t_wait = time.perf_counter()
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    n_pending = 0

    def predict(batch: torch.Tensor, index: torch.Tensor) -> float:
        t0 = time.perf_counter()
        if device.type == "cuda":
            batch = batch.pin_memory()
        x = batch.to(device, non_blocking=True)
        x = preprocess(x)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            if amp_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=amp_dtype):
                    logits = model(x)
            else:
                logits = model(x)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one clear line instead of a TorchScript traceback
            raise ModelPackageError(
                f"the model fails on a batch of {len(index)} patches ({type(exc).__name__}: {_first_line(exc)}); "
                "it passed the load check on one zero patch: check how it handles the batch dimension and "
                "real pixels, or try --batch-size 1",
                source=package.path) from None
        _check_logits(logits, len(index), cfg.num_classes, package.path)
        p = _probabilities(logits).cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        probs[index.numpy()] = p
        bar.update(len(index))
        return time.perf_counter() - t0

    with torch.inference_mode(), model:
        for item in loader:
            if isinstance(item, _ReadFailure):
                item.reraise()
            region, index, offsets, seconds = item
            wait_s += time.perf_counter() - t_wait
            read_s += float(seconds)
            t0 = time.perf_counter()
            block = torch.from_numpy(cut_patches(dataset.region(region), offsets, cfg.patch_size_pixels))
            cut_s += time.perf_counter() - t0
            pending.append((block, torch.from_numpy(index)))
            n_pending += len(index)
            # Blocks vary in size: re-batch to exactly batch_size patches per forward pass.
            while n_pending >= batch_size:
                batch, idx = torch.cat([b for b, _ in pending]), torch.cat([i for _, i in pending])
                model_s += predict(batch[:batch_size], idx[:batch_size])
                rest = (batch[batch_size:], idx[batch_size:])
                pending, n_pending = ([rest] if len(rest[1]) else []), len(rest[1])
            t_wait = time.perf_counter()
        if n_pending:
            model_s += predict(torch.cat([b for b, _ in pending]), torch.cat([i for _, i in pending]))
    bar.close()
    return InferenceResult(
        probs=probs, device=str(device), precision=precision, n_patches=n,
        seconds_total=time.perf_counter() - t_start, seconds_read=read_s, seconds_wait=wait_s,
        seconds_model=model_s, workers=workers, batch_size=batch_size,
        extra={"seconds_cut_patches": round(cut_s, 4), "n_regions": len(blocks), "model_path": model.path},
    )
