"""PCam patch readers: the read-only side of the two published patch layouts.

Both the library and the training side read PCam folders: INT8 calibration
(:func:`wsi_toolkit.runtime.calibration.calibration_from_pcam`) and training/evaluation
(:mod:`patch_model.data`, which re-exports the names here, so ``from patch_model.data import
PCamH5`` keeps working and gives the same objects). The readers live here, below both, so that
``wsi_toolkit`` never imports ``patch_model``. What only training needs (the random Kaggle splits,
:func:`patch_model.data.open_splits`, the HDF5 writer) stays in :mod:`patch_model.data`.

Both layouts are read as :class:`torch.utils.data.Dataset` of ``(patch, label)``:
``patch`` (96, 96, 3) uint8 RGB, ``label`` 1 when a tumour pixel lies in the centre 32 x 32 px.

- ``"pcam-h5"`` (:class:`PCamH5`): PatchCamelyon's gunzipped HDF5 files, read lazily (one patch
  per ``__getitem__``). Its valid and test splits come from other slides than train: honest.
- ``"kaggle"`` (:class:`KaggleFolder`): ``train/<id>.tif`` + ``train_labels.csv``. No slide ids,
  so any validation split of it is random and LEAKS.

:func:`detect_layout` says which layout a folder holds. The layouts in detail: docs/training.md, "Data".
Not imported by ``import wsi_toolkit`` (it imports torch).

Example
-------
>>> from wsi_toolkit.pcam import PCamH5, detect_layout        # doctest: +SKIP
>>> detect_layout("/data/pcam")                               # doctest: +SKIP
'pcam-h5'
>>> patch, label = PCamH5("/data/pcam", "valid")[0]           # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.utils.data

from wsi_toolkit.errors import ConfigError, WsiToolkitError

__all__ = [
    "PCAM_SPLITS",
    "PCAM_PATCH_PX",
    "PCAM_MPP",
    "Layout",
    "DataLayoutError",
    "pcam_paths",
    "PCamH5",
    "KaggleFolder",
    "detect_layout",
]

logger = logging.getLogger(__name__)

#: The three splits of PatchCamelyon, in the order they are listed everywhere.
PCAM_SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: Side of a PCam patch in pixels.
PCAM_PATCH_PX = 96
#: um/px of a PCam patch (level 2 of a 0.243 um/px Radboudumc slide: 10x).
PCAM_MPP = 0.972

_PATCH_SHAPE = (PCAM_PATCH_PX, PCAM_PATCH_PX, 3)
_PCAM_NAME = "camelyonpatch_level_2_split_{split}_{xy}.h5"
_KAGGLE_LABELS = "train_labels.csv"

Layout = Literal["pcam-h5", "kaggle"]


class DataLayoutError(WsiToolkitError, ValueError):
    """A data folder or file is not in the layout expected (PCam HDF5 or the Kaggle folder)."""


def _import_h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is in the [train] extra
        raise ImportError("reading PCam HDF5 files needs h5py: pip install 'wsi-toolkit[train]'") from exc
    return h5py


def _check_split(split: str) -> str:
    if split not in PCAM_SPLITS:
        raise ConfigError(f"split must be one of {PCAM_SPLITS}; got {split!r}")
    return split


def pcam_paths(root: str | os.PathLike, split: str, *, must_exist: bool = True) -> tuple[Path, Path]:
    """Paths ``(x.h5, y.h5)`` of one PCam split in ``root``.

    Raises :class:`DataLayoutError` when a file is missing (unless ``must_exist=False``); when
    only the published ``.h5.gz`` files are there, the message gives the ``gunzip`` command
    (the files must be decompressed once: HDF5 cannot be read lazily through gzip).
    """
    root = Path(root)
    _check_split(split)
    paths = tuple(root / _PCAM_NAME.format(split=split, xy=xy) for xy in ("x", "y"))
    if not must_exist:
        return paths  # type: ignore[return-value]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        gz = [p.with_name(p.name + ".gz") for p in missing]
        if all(g.is_file() for g in gz):
            raise DataLayoutError(
                f"{root}: PCam {split!r} is still gzip-compressed ({', '.join(g.name for g in gz)}); "
                f"gunzip them first: gunzip -k {' '.join(str(g) for g in gz)}"
            )
        raise DataLayoutError(
            f"{root}: PCam {split!r} split missing {', '.join(p.name for p in missing)}; expected "
            f"{paths[0].name} and {paths[1].name} (PatchCamelyon as published, gunzipped)"
        )
    return paths  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# PCam HDF5
# --------------------------------------------------------------------------------------------


class PCamH5(torch.utils.data.Dataset):
    """One split of PatchCamelyon in its published HDF5 files, read lazily.

    ``ds[i]`` is ``(patch, label)``: (96, 96, 3) uint8 RGB and int 0/1. Only the patch asked
    for is read (one ``x[i]`` HDF5 read); the labels (``y``, 1 byte per patch) are read once
    on construction. The ``x`` file is opened in each process on its first ``__getitem__``
    and the handle is not pickled, so the data set works with DataLoader workers (fork or
    spawn).

    Attributes
    ----------
    split : str
    x_path, y_path : Path
    leaky : bool
        Always False: PCam's splits are slide-disjoint.
    description : str
        One line saying what the data is, for logs and model provenance.

    Raises
    ------
    DataLayoutError
        Missing files, wrong dataset names, shapes or dtypes, or ``x``/``y`` lengths differ.
    """

    leaky: bool = False

    def __init__(self, root: str | os.PathLike, split: str):
        self.root = Path(root)
        self.split = _check_split(split)
        self.x_path, self.y_path = pcam_paths(self.root, split)
        h5py = _import_h5py()
        n = self._check_x(h5py)
        self._labels = self._read_labels(h5py, n)
        self._x_file = None
        self._x = None
        self._pid: int | None = None
        honest = "slide-disjoint from train" if split != "train" else "the training slides"
        self.description = (
            f"PCam HDF5 {split!r} split ({honest}): {n} patches of 96 px at 0.972 um/px, "
            f"{int(self._labels.sum())} tumour; {self.x_path}"
        )

    def _check_x(self, h5py) -> int:
        try:
            with h5py.File(self.x_path, "r") as f:
                if "x" not in f:
                    raise DataLayoutError(f"{self.x_path}: no dataset 'x' (has {sorted(f.keys())}); not a PCam x file")
                x = f["x"]  # metadata only: nothing is read
                shape, dtype = tuple(x.shape), x.dtype
        except OSError as exc:
            raise DataLayoutError(f"{self.x_path}: not a readable HDF5 file ({exc}); re-download or gunzip it") from exc
        if len(shape) != 4 or shape[1:] != _PATCH_SHAPE or dtype != np.uint8:
            raise DataLayoutError(
                f"{self.x_path}: dataset 'x' is {shape} {dtype}; PCam x is (N, 96, 96, 3) uint8"
            )
        return int(shape[0])

    def _read_labels(self, h5py, n: int) -> np.ndarray:
        try:
            with h5py.File(self.y_path, "r") as f:
                if "y" not in f:
                    raise DataLayoutError(f"{self.y_path}: no dataset 'y' (has {sorted(f.keys())}); not a PCam y file")
                y = f["y"]
                if y.ndim < 1 or int(np.prod(y.shape[1:], dtype=np.int64)) != 1:
                    raise DataLayoutError(f"{self.y_path}: dataset 'y' is {y.shape}; PCam y is (N, 1, 1, 1)")
                labels = np.asarray(y[()]).reshape(-1)
        except OSError as exc:
            raise DataLayoutError(f"{self.y_path}: not a readable HDF5 file ({exc}); re-download or gunzip it") from exc
        if len(labels) != n:
            raise DataLayoutError(
                f"{self.root}: PCam {self.split!r} has {n} patches in x but {len(labels)} labels in y")
        if labels.size and not np.isin(labels, (0, 1)).all():
            bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
            raise DataLayoutError(f"{self.y_path}: labels must be 0 or 1; found {bad.tolist()}")
        labels = labels.astype(np.int64)
        labels.flags.writeable = False
        return labels

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels, 1 = tumour in the centre 32 x 32 region (read-only)."""
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def _dataset(self):
        pid = os.getpid()
        if self._x is None or self._pid != pid:
            # A handle inherited through fork is never reused: HDF5 file state is per process.
            h5py = _import_h5py()
            self._x_file = h5py.File(self.x_path, "r")
            self._x = self._x_file["x"]
            self._pid = pid
        return self._x

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self._labels)
        try:
            idx = int(i)  # accepts numpy / torch integer scalars; not slices
        except TypeError:
            raise TypeError(f"PCamH5 index must be an integer; got {type(i).__name__}") from None
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {i} out of range for PCam {self.split!r} with {n} patches")
        patch = np.asarray(self._dataset()[idx])  # reads this one patch only
        return patch, int(self._labels[idx])

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._x_file is not None and self._pid == os.getpid():
            self._x_file.close()
        self._x_file = self._x = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_x_file=None, _x=None, _pid=None)  # h5py handles cannot cross processes
        return state

    def __repr__(self) -> str:
        return f"<PCamH5 {self.split!r} {len(self)} patches, {self.x_path.parent}>"


# --------------------------------------------------------------------------------------------
# Kaggle folder
# --------------------------------------------------------------------------------------------


def _read_kaggle_labels(root: Path) -> dict[str, int]:
    csv_path = root / _KAGGLE_LABELS
    if not csv_path.is_file():
        raise DataLayoutError(f"{root}: no {_KAGGLE_LABELS}; the Kaggle layout is train/<id>.tif + {_KAGGLE_LABELS}")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["id", "label"]:
            raise DataLayoutError(f"{csv_path}: header must start with 'id,label'; got {header!r}")
        out: dict[str, int] = {}
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                label = int(row[1])
            except (IndexError, ValueError):
                raise DataLayoutError(f"{csv_path}:{line_no}: expected '<id>,<0|1>'; got {row!r}") from None
            if label not in (0, 1):
                raise DataLayoutError(f"{csv_path}:{line_no}: label must be 0 or 1; got {label}")
            out[row[0].strip()] = label
    if not out:
        raise DataLayoutError(f"{csv_path}: no rows")
    return out


class KaggleFolder(torch.utils.data.Dataset):
    """The Kaggle histopathologic-cancer-detection training folder (or a subset of its ids).

    ``ds[i]`` is ``(patch, label)``: (96, 96, 3) uint8 RGB read from ``root/train/<id>.tif``
    and the int label from ``root/train_labels.csv``. ``ids`` selects and orders the patches
    (default: every row of the CSV, in file order); ``split_name`` names the subset in
    :attr:`description`. The ``test/`` folder has no labels and is not read here.

    ``leaky`` is True for subsets made by :func:`patch_model.data.kaggle_split`: the layout has no
    slide ids, so such a validation set shares slides with training and its numbers are optimistic.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        ids: Sequence[str] | None = None,
        split_name: str = "train",
        leaky: bool = False,
    ):
        self.root = Path(root)
        self.split_name = str(split_name)
        self.leaky = bool(leaky)
        image_dir = self.root / "train"
        if not image_dir.is_dir():
            raise DataLayoutError(f"{self.root}: no train/ folder; the Kaggle layout is train/<id>.tif + "
                                  f"{_KAGGLE_LABELS}"
                                  + (" (unzip train.zip first)" if (self.root / "train.zip").is_file() else ""))
        table = _read_kaggle_labels(self.root)
        if ids is None:
            self.ids: list[str] = list(table)
        else:
            self.ids = [str(i) for i in ids]
            unknown = [i for i in self.ids if i not in table]
            if unknown:
                raise DataLayoutError(
                    f"{self.root / _KAGGLE_LABELS}: {len(unknown)} ids not listed, e.g. {unknown[:3]}")
        self._labels = np.fromiter((table[i] for i in self.ids), dtype=np.int64, count=len(self.ids))
        self._labels.flags.writeable = False
        self.image_dir = image_dir
        # Checking 220,000 files up front costs seconds; the first one catches a wrong folder.
        if self.ids and not self._path(0).is_file():
            raise DataLayoutError(
                f"{self._path(0)} is missing; {_KAGGLE_LABELS} lists ids whose images are not in train/")
        kind = ("RANDOM split without slide ids -- LEAKY: its slides are also in train; "
                "call metrics on it leaky") if self.leaky else "Kaggle layout, no slide ids"
        self.description = (
            f"Kaggle histopathologic-cancer-detection {self.split_name!r}: {len(self.ids)} patches "
            f"({int(self._labels.sum())} tumour), {kind}; {self.root}"
        )

    def _path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}.tif"

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels in the order of :attr:`ids` (read-only)."""
        return self._labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        import tifffile

        n = len(self.ids)
        idx = int(i)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {i} out of range for {n} patches")
        path = self._path(idx)
        try:
            patch = tifffile.imread(path)
        except FileNotFoundError:
            raise DataLayoutError(f"{path} is missing (listed in {_KAGGLE_LABELS})") from None
        except (tifffile.TiffFileError, ValueError) as exc:
            raise DataLayoutError(f"{path}: not a readable TIFF ({exc})") from exc
        if patch.shape != _PATCH_SHAPE or patch.dtype != np.uint8:
            raise DataLayoutError(f"{path}: image is {patch.shape} {patch.dtype}; Kaggle patches are (96, 96, 3) uint8")
        return patch, int(self._labels[idx])

    def __repr__(self) -> str:
        return f"<KaggleFolder {self.split_name!r} {len(self)} patches{' LEAKY' if self.leaky else ''}, {self.root}>"


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------


def detect_layout(root: str | os.PathLike) -> Layout:
    """``"pcam-h5"`` or ``"kaggle"``: which published layout ``root`` holds.

    PCam wins when both are present. Raises :class:`DataLayoutError` naming both expected
    layouts when neither is found (and the ``gunzip`` command when only PCam's ``.h5.gz`` are).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{root} is not a folder; pass the folder holding the PCam .h5 files or the Kaggle data")
    h5 = [p for s in PCAM_SPLITS for p in pcam_paths(root, s, must_exist=False)]
    if any(p.is_file() for p in h5):
        if (root / _KAGGLE_LABELS).is_file():
            logger.info("%s holds both PCam HDF5 and the Kaggle layout; using PCam (slide-disjoint splits)", root)
        return "pcam-h5"
    if (root / _KAGGLE_LABELS).is_file() and (root / "train").is_dir():
        return "kaggle"
    gz = [p.with_name(p.name + ".gz") for p in h5]
    present_gz = [g for g in gz if g.is_file()]
    if present_gz:
        raise DataLayoutError(
            f"{root}: PCam files are still gzip-compressed; gunzip them first: "
            f"gunzip -k {' '.join(str(g) for g in present_gz)}"
        )
    hint = " (unzip train.zip first)" if (root / "train.zip").is_file() else ""
    raise DataLayoutError(
        f"{root}: no patch data found{hint}; expected either PCam HDF5 "
        f"(camelyonpatch_level_2_split_{{train,valid,test}}_{{x,y}}.h5) or the Kaggle layout "
        f"(train/<id>.tif and {_KAGGLE_LABELS})"
    )
