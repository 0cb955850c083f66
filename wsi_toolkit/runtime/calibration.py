"""Calibration patches for INT8 quantization: from the tissue of the slides being run, or a PCam folder.

Static quantization measures the range of every activation on a few hundred real patches. The
default is tissue of the slides about to be analysed (the model sees what it will quantize for);
``--calibration DIR`` takes patches from a PCam folder (HDF5 or Kaggle layout) instead. Patches are
uint8 RGB at the model's patch size and um/px, chosen with a seed, so a calibration set and its
:attr:`CalibrationSet.fingerprint` (which keys the quantized model in the cache) are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.limits import check_int

if TYPE_CHECKING:
    from wsi_toolkit.model_package import ModelPackage
    from wsi_toolkit.slide import ReadFrom

__all__ = ["CALIBRATION_PATCHES", "CalibrationSet", "calibration_from_dataset", "calibration_from_pcam",
           "calibration_from_slides", "load_calibration", "save_calibration"]

log = logging.getLogger(__name__)

#: Patches used to calibrate by default: NNCF's own default subset is 300 samples.
CALIBRATION_PATCHES = 300


@dataclass(frozen=True)
class CalibrationSet:
    """``patches``: (N, S, S, 3) uint8 RGB; ``source``: where they came from, in words."""

    patches: np.ndarray
    source: str
    seed: int = 0
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        p = self.patches
        if not (isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.ndim == 4 and p.shape[-1] == 3
                and len(p) > 0):
            desc = f"shape {p.shape} dtype {p.dtype}" if isinstance(p, np.ndarray) else type(p).__name__
            raise ConfigError(f"calibration patches must be a non-empty (N, S, S, 3) uint8 array; got {desc}")
        h = hashlib.sha256(repr(p.shape).encode("ascii"))
        h.update(np.ascontiguousarray(p).tobytes())
        object.__setattr__(self, "fingerprint", h.hexdigest()[:24])

    def __len__(self) -> int:
        return len(self.patches)

    def describe(self) -> dict:
        return {"source": self.source, "n_patches": len(self), "seed": self.seed, "fingerprint": self.fingerprint}


def _spread(n_items: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``min(k, n_items)`` indices spread over ``range(n_items)``: one random pick per equal stratum."""
    k = min(k, n_items)
    edges = np.linspace(0, n_items, k + 1)
    return np.minimum((edges[:-1] + rng.random(k) * np.diff(edges)).astype(np.int64), n_items - 1)


def calibration_from_slides(slide_paths: Sequence[str | os.PathLike], package: ModelPackage, *,
                            n: int = CALIBRATION_PATCHES, seed: int = 0, mpp: float | None = None,
                            backend: str = "auto", min_tissue_fraction: float = 0.5,
                            thumb_mpp: float = 8.0, max_slides: int = 8,
                            read_from: ReadFrom = "nearest") -> CalibrationSet:
    """About ``n`` patches from the tissue of ``slide_paths``, spread over each slide's grid.

    At most ``max_slides`` slides are used, spread over the list. Tissue is found as ``wsi-infer``
    finds it (:func:`~wsi_toolkit.tissue.detect_tissue` on the thumbnail); the grid has
    non-overlapping cells of the model's patch size, and one cell is drawn (seeded) from each of
    ``n / slides`` equal runs of the tissue cells in row order. Patches are read at the model's
    um/px as ``wsi-infer`` reads them (:meth:`~wsi_toolkit.slide.SlideReader.read_at_mpp` with
    ``read_from``). A slide that cannot be read is
    skipped with a warning.
    """
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tiling import GridConfig, make_grid
    from wsi_toolkit.tissue import TissueConfig, detect_tissue

    check_int(n, "calibration patches")
    check_int(max_slides, "max_slides")
    paths = [Path(p) for p in slide_paths]
    if not paths:
        raise ConfigError("calibration from slides needs at least one slide")
    if len(paths) > max_slides:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, max_slides).round()]
    cfg = package.config
    px, spacing = cfg.patch_size_pixels, cfg.spacing_um_px
    grid_cfg = GridConfig(patch_px=px, spacing_um_px=spacing, stride_px=px, min_tissue_fraction=min_tissue_fraction)
    rng = np.random.default_rng(seed)
    per_slide = math.ceil(n / len(paths))
    chunks = []
    for path in paths:
        try:
            with open_slide(path, mpp=mpp, backend=backend) as reader:  # type: ignore[arg-type]
                tissue = detect_tissue(reader.thumbnail(mpp=thumb_mpp), l0_mpp=reader.mpp,
                                       config=TissueConfig(thumb_mpp=thumb_mpp))
                grid = make_grid(l0_size=reader.dimensions, l0_mpp=reader.mpp, config=grid_cfg,
                                 tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px, require_patches=False)
                if len(grid) == 0:
                    log.warning("calibration: no tissue cell on %s; skipped", path.name)
                    continue
                pick = _spread(len(grid), per_slide, rng)
                xy = grid.patch_l0_xy(grid.grid_rc[pick])
                chunks.append(np.stack([reader.read_at_mpp((float(x), float(y)), (px, px), spacing,
                                                           read_from=read_from)
                                        for x, y in xy]))
        except WsiToolkitError as exc:
            log.warning("calibration: %s skipped (%s)", path.name, exc)
    if not chunks:
        raise ConfigError(f"calibration: no tissue found on {len(paths)} slide(s); give a PCam folder with "
                          "--calibration DIR")
    patches = np.concatenate(chunks)[:n]
    names = ", ".join(p.name for p in paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
    return CalibrationSet(patches, source=f"{len(patches)} patches of tissue of {len(paths)} slide(s): {names}",
                          seed=seed)


def calibration_from_dataset(ds, *, n: int = CALIBRATION_PATCHES, seed: int = 0, source: str = "") -> CalibrationSet:
    """``n`` seeded random patches of a patch dataset (``ds[i] = (patch, label)``, e.g. a split of
    :func:`patch_model.data.open_splits`). Labels are not used."""
    check_int(n, "calibration patches")
    if len(ds) == 0:
        raise ConfigError(f"calibration: {source or 'the patch set'} holds no patches")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))
    patches = np.stack([np.asarray(ds[int(i)][0], np.uint8) for i in idx])
    return CalibrationSet(patches, source=f"{len(patches)} patches of {source or 'a patch set'}", seed=seed)


def calibration_from_pcam(root: str | os.PathLike, *, n: int = CALIBRATION_PATCHES, seed: int = 0,
                          split: str = "train") -> CalibrationSet:
    """``n`` seeded random patches of a PCam folder: PCam HDF5 (``split``) or the Kaggle layout
    (``train/``, all of it), as :func:`wsi_toolkit.pcam.detect_layout` finds it. Labels are not used."""
    from wsi_toolkit.pcam import KaggleFolder, PCamH5, detect_layout

    root = Path(root)
    layout = detect_layout(root)
    ds = PCamH5(root, split) if layout == "pcam-h5" else KaggleFolder(root)
    where = f"{layout} {split}" if layout == "pcam-h5" else "kaggle train/"
    try:
        return calibration_from_dataset(ds, n=n, seed=seed, source=f"{root.name} ({where})")
    finally:
        close = getattr(ds, "close", None)
        if close is not None:
            close()


def save_calibration(calibration: CalibrationSet, folder: str | os.PathLike) -> Path:
    """Write ``calibration``'s patches as ``<folder>/<fingerprint>.npy``, its description beside it
    (``.json``), atomically; an existing file of that name holds the same patches and is kept.
    Returns the ``.npy`` path, for :func:`load_calibration`."""
    from wsi_toolkit.atomic import atomic_path, write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{calibration.fingerprint}.npy"
    if not path.is_file():
        write_json_atomic(path.with_suffix(".json"), calibration.describe())
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, calibration.patches, allow_pickle=False)
    return path


def load_calibration(path: str | os.PathLike, *, n: int = CALIBRATION_PATCHES, seed: int = 0) -> CalibrationSet:
    """Calibration patches from ``path``: a PCam folder (:func:`calibration_from_pcam`) or an ``.npy``
    of (N, S, S, 3) uint8 patches written by :func:`save_calibration`."""
    path = Path(path)
    if path.is_dir():
        return calibration_from_pcam(path, n=n, seed=seed)
    try:
        patches = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"calibration {path}: neither a PCam folder nor an .npy of uint8 patches ({exc})") from None
    source, saved_seed = f"{len(patches)} patches of {path.name}", seed
    try:  # the description save_calibration wrote beside it
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        source, saved_seed = str(meta["source"]), int(meta["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return CalibrationSet(patches, source=source, seed=saved_seed)
