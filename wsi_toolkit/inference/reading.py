"""Reading patches for inference: region blocks read by a few threads, patches cut in memory.

Patches are read in blocks: one region at the model's um/px covering many neighbouring patches
(:func:`plan_blocks`), so each pixel is decoded once even where patches overlap; the patches are
then cut from the region at integer offsets (:func:`cut_patches`). :class:`PatchBlocks` reads the
blocks, in order, with a small pool of threads sharing one slide handle: JPEG decoding
(imagecodecs, OpenSlide) and resampling (PIL) release the GIL, and the handle's decoded-tile cache
is shared, so neighbouring blocks read by different threads still decode each tile once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_toolkit.slide import ReadFrom, SlideReader, open_slide
from wsi_toolkit.tiling import PatchGrid

__all__ = ["Block", "PatchBlocks", "cut_patches", "plan_blocks", "single_patch_blocks"]


@dataclass(frozen=True)
class Block:
    """Patches read from one region: indices into the patch list, offsets in model px."""

    index: np.ndarray  # int64 (n,)
    region_l0_xy: tuple[float, float]  # top-left of the region in level-0 px
    region_px: tuple[int, int]  # (w, h) in model px
    offsets_px: np.ndarray  # int64 (n, 2): (x, y) of each patch inside the region


def plan_blocks(grid: PatchGrid, *, block_cells: int = 8) -> list[Block]:
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
        x_l0, y_l0 = (float(v) for v in grid.patch_l0_xy(np.array([[r0, c0]]))[0])
        region_l0_xy = (x_l0, y_l0)
        region_px = (int((c1 - c0) * cfg.stride_px + cfg.patch_px), int((r1 - r0) * cfg.stride_px + cfg.patch_px))
        offsets = np.column_stack([(sub[:, 1] - c0) * cfg.stride_px, (sub[:, 0] - r0) * cfg.stride_px]).astype(np.int64)
        blocks.append(Block(idx.astype(np.int64), region_l0_xy, region_px, offsets))
    return blocks


def single_patch_blocks(patch_l0_xy: np.ndarray, patch_px: int) -> list[Block]:
    """One block per patch (level-0 top-left corners, float (N, 2)), in the given order."""
    xy = np.asarray(patch_l0_xy, np.float64)
    return [Block(np.array([i], np.int64), (float(x), float(y)), (patch_px, patch_px), np.zeros((1, 2), np.int64))
            for i, (x, y) in enumerate(xy)]


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


class PatchBlocks:
    """The patches of ``blocks``, read block by block in the given order.

    Iterating :meth:`read` yields, per block, ``(patches (n, p, p, 3) uint8, patch indices (n,),
    read seconds)``. With ``threads > 0`` a pool of that many threads reads ahead (at most
    ``prefetch`` blocks per thread in flight, so memory stays a few regions whatever the slide)
    while the caller uses the patches; blocks still come out in order, so the result does not
    depend on the thread count. All threads share one slide handle, opened for the iteration and
    closed after it, with a tile cache of a few rows of the level read
    (:meth:`~wsi_toolkit.slide.SlideReader.reserve_tile_cache`). A read that fails raises its own
    exception in the caller, as without threads. ``read_from`` picks the pyramid level the regions
    are read from and shrunk (:meth:`~wsi_toolkit.slide.SlideReader.read_at_mpp`), in the reader
    threads: the model gets uint8 patches at ``spacing_um_px`` whichever level was decoded. With
    ``oversample_ok`` (the model's package resizes its input) and ``read_from`` other than ``nearest``,
    a level finer than ``spacing_um_px`` is handed on at twice the pixels (``2 * patch_px`` at half the
    um/px, :attr:`oversample` = 2), so the package's Resize makes the model's input from it in one
    step instead of through ``patch_px`` first (docs/frames.md says why).
    """

    def __init__(self, slide_path: str | Path, blocks: list[Block], *, patch_px: int, spacing_um_px: float,
                 mpp: float | None = None, backend: str = "auto", read_from: ReadFrom = "nearest",
                 oversample_ok: bool = False):
        self.slide_path = str(slide_path)
        self.blocks = blocks
        self.patch_px = int(patch_px)
        self.spacing_um_px = float(spacing_um_px)
        self.mpp = mpp
        self.backend = backend
        self.read_from = read_from
        self.oversample_ok = oversample_ok
        #: set when :meth:`read` opens the slide: the level read and the oversampling factor used
        self.level: int | None = None
        self.oversample = 1

    def __len__(self) -> int:
        return len(self.blocks)

    def read(self, threads: int = 0, *, prefetch: int = 4) -> Generator[tuple[np.ndarray, np.ndarray, float]]:
        """The blocks' patches in order; see the class docstring."""
        if not self.blocks:
            return
        with open_slide(self.slide_path, mpp=self.mpp, backend=self.backend) as slide:  # type: ignore[arg-type]
            self.level = slide.read_level_for(self.spacing_um_px, self.read_from)
            finer = slide.level_mpp(self.level) < self.spacing_um_px * (1 - 1e-6)
            self.oversample = 2 if self.oversample_ok and self.read_from != "nearest" and finer else 1
            slide.reserve_tile_cache(self.spacing_um_px, read_from=self.read_from)
            if threads <= 0:
                for b in self.blocks:
                    yield self._read_block(slide, b)
                return
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsi-read")
            try:
                todo = iter(self.blocks)
                ahead: deque[Future] = deque()
                for b in todo:
                    ahead.append(pool.submit(self._read_block, slide, b))
                    if len(ahead) >= threads * prefetch:
                        break
                while ahead:
                    item = ahead.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        ahead.append(pool.submit(self._read_block, slide, nxt))
                    yield item
            finally:
                # On an error or an early stop: drop what has not started, wait for what has
                # (the slide handle closes after this).
                pool.shutdown(wait=True, cancel_futures=True)

    def _read_block(self, slide: SlideReader, b: Block) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        k = self.oversample
        region = slide.read_at_mpp(b.region_l0_xy, b.region_px, self.spacing_um_px, read_from=self.read_from,
                                   oversample=k)
        patches = cut_patches(region, b.offsets_px * k, self.patch_px * k)
        return patches, b.index, time.perf_counter() - t0
