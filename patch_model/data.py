"""Patch data sets for training and evaluating the PCam patch classifier.

Both published layouts are read as :class:`torch.utils.data.Dataset` of ``(patch, label)``:
``patch`` (96, 96, 3) uint8 RGB, ``label`` 1 when a tumour pixel lies in the centre 32 x 32 px.

- ``"pcam-h5"`` (:class:`PCamH5`): PatchCamelyon's gunzipped HDF5 files, read lazily (one patch
  per ``__getitem__``). Its valid and test splits come from other slides than train: honest.
- ``"kaggle"`` (:class:`KaggleFolder`): ``train/<id>.tif`` + ``train_labels.csv``. No slide ids,
  so any validation split of it (:func:`kaggle_splits`) is random, LEAKS, and is marked ``leaky``.

The readers (:class:`DataLayoutError`, :func:`pcam_paths`, :class:`PCamH5`, :class:`KaggleFolder`,
:func:`detect_layout`, ``Layout``, ``PCAM_SPLITS``, ``PCAM_PATCH_PX``, ``PCAM_MPP``) moved down into
:mod:`wsi_toolkit.pcam`, which the library's INT8 calibration reads PCam folders with too; they are
re-exported here (the same objects), so ``from patch_model.data import PCamH5`` keeps working.
What only training needs stays here: the class names, the random Kaggle splits
(:func:`kaggle_splits`, :func:`check_split_fractions`), :func:`open_splits`, and
:func:`write_pcam_h5`, which writes the PCam layout. The layouts in detail: docs/training.md, "Data".

Example
-------
>>> splits = open_splits("/data/pcam")                        # doctest: +SKIP
>>> patch, label = splits["valid"][0]                         # doctest: +SKIP
>>> patch.shape, patch.dtype, splits["valid"].leaky           # doctest: +SKIP
((96, 96, 3), dtype('uint8'), False)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from wsi_toolkit.atomic import atomic_path
from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.limits import check_number

# The readers, moved down into the library (module docstring); re-exported: the same objects.
from wsi_toolkit.pcam import (  # noqa: F401 - Layout: re-exported for old imports
    _KAGGLE_LABELS,
    _PATCH_SHAPE,
    PCAM_MPP,
    PCAM_PATCH_PX,
    PCAM_SPLITS,
    DataLayoutError,
    KaggleFolder,
    Layout,
    PCamH5,
    _check_split,
    _import_h5py,
    _read_kaggle_labels,
    detect_layout,
    pcam_paths,
)

__all__ = [
    "CLASS_NAMES",
    "TUMOR_INDEX",
    "PCAM_SPLITS",
    "PCAM_PATCH_PX",
    "PCAM_MPP",
    "DataLayoutError",
    "pcam_paths",
    "PCamH5",
    "KaggleFolder",
    "kaggle_split",
    "kaggle_splits",
    "check_split_fractions",
    "detect_layout",
    "open_splits",
    "write_pcam_h5",
]

logger = logging.getLogger(__name__)

#: Class names, in PCam label order: index 1 ("tumor") is PCam label 1.
CLASS_NAMES: tuple[str, str] = ("notumor", "tumor")
#: Index of the tumour class (PCam label 1).
TUMOR_INDEX = 1


def kaggle_splits(
    root: str | os.PathLike, *, valid_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 42
) -> dict[str, KaggleFolder]:
    """Random ``{"train", "valid"[, "test"]}`` split of the Kaggle folder; every part ``leaky=True``.

    The Kaggle layout has no slide ids, so patches of one slide land in every part: the
    validation (and test) numbers are optimistic (this is how the article's 98.6 % was measured)
    and must be reported as leaky. A WARNING saying so is logged. ``test_fraction > 0`` holds a
    third part back from training AND from the best-epoch choice (which looks at valid), so its
    numbers are not inflated by model selection; they still share slides with train. The valid
    ids depend only on ``seed`` and ``valid_fraction``: adding a test part takes it from train.
    Use PCam's slide-disjoint valid/test for honest numbers.
    """
    check_split_fractions(valid_fraction, test_fraction)
    root = Path(root)
    ids = list(_read_kaggle_labels(root))
    n_parts = 3 if test_fraction > 0 else 2
    if len(ids) < n_parts:
        raise DataLayoutError(f"{root / _KAGGLE_LABELS}: {len(ids)} row(s); a split needs at least {n_parts}")
    n_valid = min(max(1, round(len(ids) * valid_fraction)), len(ids) - n_parts + 1)
    n_test = 0 if not test_fraction else min(max(1, round(len(ids) * test_fraction)), len(ids) - n_valid - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = {"valid": order[:n_valid], "test": order[len(ids) - n_test:], "train": order[n_valid:len(ids) - n_test]}
    logger.warning(
        "%s: Kaggle layout has no slide ids, so this random train/valid%s split (%d/%d%s patches, seed %d) LEAKS: "
        "the same slides are in every part. Validation numbers on it are optimistic and must be called "
        "leaky (the article's 98.6%% was measured this way); use PCam's slide-disjoint valid/test for honest numbers.",
        root, "/test" if n_test else "", len(parts["train"]), n_valid, f"/{n_test}" if n_test else "", seed,
    )
    return {name: KaggleFolder(root, ids=[ids[i] for i in np.sort(idx)], split_name=name, leaky=True)
            for name, idx in parts.items() if len(idx)}


def check_split_fractions(valid_fraction: float, test_fraction: float = 0.0) -> tuple[float, float]:
    """``(valid_fraction, test_fraction)`` as floats: valid in (0, 1), test in [0, 1), their sum < 1;
    else :class:`ConfigError`."""
    valid = check_number(valid_fraction, "valid_fraction", bounds=(0.0, 1.0))
    if not 0 < valid < 1:
        raise ConfigError(f"valid_fraction must be in (0, 1); got {valid_fraction!r}")
    test = check_number(test_fraction, "test_fraction", bounds=(0.0, 1.0))
    if not (test < 1 and valid + test < 1):
        raise ConfigError(f"test_fraction must be in [0, 1) with valid_fraction + test_fraction < 1; got "
                          f"{test_fraction!r} (valid_fraction {valid_fraction!r})")
    return valid, test


def kaggle_split(
    root: str | os.PathLike, *, valid_fraction: float = 0.1, seed: int = 42
) -> tuple[KaggleFolder, KaggleFolder]:
    """Random ``(train, valid)`` split of the Kaggle folder; both flagged ``leaky=True``
    (:func:`kaggle_splits` without a test part)."""
    parts = kaggle_splits(root, valid_fraction=valid_fraction, seed=seed)
    return parts["train"], parts["valid"]


def open_splits(
    root: str | os.PathLike, *, valid_fraction: float = 0.1, seed: int = 42, test_fraction: float = 0.0
) -> dict[str, torch.utils.data.Dataset]:
    """``{"train": ..., "valid": ..., "test": ...}`` for either layout.

    PCam: the published splits (train and valid required, test when present), slide-disjoint,
    ``leaky=False``. Kaggle: :func:`kaggle_splits` (``valid_fraction``, ``test_fraction``, ``seed``),
    all ``leaky=True`` with a warning; a ``"test"`` part only with ``test_fraction > 0`` (Kaggle's
    own test/ is unlabelled).
    """
    root = Path(root)
    layout = detect_layout(root)
    if layout == "kaggle":
        if (root / "test").is_dir():
            logger.info("%s: Kaggle test/ is unlabelled (scored by Kaggle); not read", root)
        return dict(kaggle_splits(root, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed))
    out: dict[str, torch.utils.data.Dataset] = {}
    for split in PCAM_SPLITS:
        present = any(p.is_file() for p in pcam_paths(root, split, must_exist=False))
        if split in ("train", "valid") or present:
            out[split] = PCamH5(root, split)  # raises naming the missing file
    return out


# --------------------------------------------------------------------------------------------
# Writing the PCam layout
# --------------------------------------------------------------------------------------------


class _PCamWriter:
    """Append patches to a split's x/y files under temporary names; ``commit`` renames both
    (:func:`wsi_toolkit.atomic.atomic_path`), ``abort`` deletes them.

    ``x`` is chunked one patch per chunk (a random read decompresses 27 KB, not a block of
    neighbours) and gzip-compressed like the published files; ``y`` is (N, 1, 1, 1) uint8.
    """

    def __init__(self, root: Path, split: str, *, expected: int | None = None):
        h5py = _import_h5py()
        root.mkdir(parents=True, exist_ok=True)
        self.final = pcam_paths(root, split, must_exist=False)
        self._files = contextlib.ExitStack()
        # Entered y first so that commit renames x first (the stack closes last-in first-out).
        tmp_y = self._files.enter_context(atomic_path(self.final[1]))
        tmp_x = self._files.enter_context(atomic_path(self.final[0]))
        self.tmp = (tmp_x, tmp_y)
        try:
            self._xf = h5py.File(self.tmp[0], "w")
        except BaseException:
            self.abort()
            raise
        self._x = self._xf.create_dataset(
            "x", shape=(expected or 0, *_PATCH_SHAPE), maxshape=(None, *_PATCH_SHAPE), dtype=np.uint8,
            chunks=(1, *_PATCH_SHAPE), compression="gzip", compression_opts=4,
        )
        self._y: list[np.ndarray] = []
        self.n = 0

    def append(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.shape[1:] != _PATCH_SHAPE or x.dtype != np.uint8:
            raise ConfigError(f"patches must be (n, 96, 96, 3) uint8; got {x.shape} {x.dtype}")
        y = np.asarray(y).reshape(-1)
        if len(y) != len(x):
            raise ConfigError(f"{len(x)} patches but {len(y)} labels")
        if self._x.shape[0] < self.n + len(x):
            self._x.resize(self.n + len(x), axis=0)
        self._x[self.n : self.n + len(x)] = x
        self._y.append(y)
        self.n += len(x)

    def commit(self) -> None:
        h5py = _import_h5py()
        if self._x.shape[0] != self.n:
            self._x.resize(self.n, axis=0)
        self._xf.close()
        y = np.concatenate(self._y) if self._y else np.zeros(0, np.uint8)
        with h5py.File(self.tmp[1], "w") as f:
            f.create_dataset("y", data=y.astype(np.uint8).reshape(-1, 1, 1, 1))
        self._files.close()  # both renamed (or, on an error, both temporaries deleted)

    def abort(self) -> None:
        try:
            self._xf.close()
        except Exception:  # noqa: BLE001 - already closed, broken or never opened; the files go anyway
            pass
        # Closing the stack with an exception makes each atomic_path delete its temporary file.
        self._files.__exit__(WsiToolkitError, WsiToolkitError("aborted"), None)


def _labels_array(y: Any) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim == 0 or int(np.prod(arr.shape[1:], dtype=np.int64)) != 1:
        raise ConfigError(f"y must be (N,) or (N, 1, 1, 1) labels; got shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ConfigError("y must hold 0/1 labels")
    return arr.astype(np.uint8)


def write_pcam_h5(
    root: str | os.PathLike,
    split: str,
    x: np.ndarray | Iterable[np.ndarray],
    y: np.ndarray,
) -> None:
    """Write one split in the published PCam layout.

    ``root/camelyonpatch_level_2_split_{split}_x.h5`` gets dataset ``x`` (N, 96, 96, 3) uint8
    (chunks of one patch, gzip), ``..._y.h5`` gets ``y`` (N, 1, 1, 1) uint8. ``x`` is an array
    or an iterable of (n_i, 96, 96, 3) chunks (so a large set never sits in memory);
    ``y`` holds the N labels 0/1, shaped (N,) or (N, 1, 1, 1). Both files are written under
    temporary names and renamed when complete.
    """
    root = Path(root)
    _check_split(split)
    labels = _labels_array(y)
    chunks: Iterable[np.ndarray] = [x] if isinstance(x, np.ndarray) else x
    writer = _PCamWriter(root, split, expected=len(labels))
    try:
        for chunk in chunks:
            chunk = np.asarray(chunk)
            n = 1 if chunk.ndim == 3 else len(chunk)
            if writer.n + n > len(labels):
                raise ConfigError(f"x holds more patches than the {len(labels)} labels in y")
            writer.append(chunk, labels[writer.n : writer.n + n])
        if writer.n != len(labels):
            raise ConfigError(f"x holds {writer.n} patches but y has {len(labels)} labels")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
