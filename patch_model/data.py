"""Patch data sets for training and evaluating the PCam patch classifier.

Both published layouts are read as :class:`torch.utils.data.Dataset` of ``(patch, label)``:
``patch`` (96, 96, 3) uint8 RGB, ``label`` 1 when a tumour pixel lies in the centre 32 x 32 px.

- ``"pcam-h5"`` (:class:`PCamH5`): PatchCamelyon's gunzipped HDF5 files, read lazily (one patch
  per ``__getitem__``). Its valid and test splits come from other slides than train: honest.
- ``"kaggle"`` (:class:`KaggleFolder`): ``train/<id>.tif`` + ``train_labels.csv``. No slide ids,
  so any validation split of it (:func:`kaggle_splits`) is random, LEAKS, and is marked ``leaky``.

:func:`write_pcam_h5` writes the PCam layout. The layouts in detail: docs/training.md, "Data".

Example
-------
>>> splits = open_splits("/data/pcam")                        # doctest: +SKIP
>>> patch, label = splits["valid"][0]                         # doctest: +SKIP
>>> patch.shape, patch.dtype, splits["valid"].leaky           # doctest: +SKIP
((96, 96, 3), dtype('uint8'), False)
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.utils.data

from wsi_toolkit.atomic import atomic_path
from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.limits import check_number

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

    ``leaky`` is True for subsets made by :func:`kaggle_split`: the layout has no slide ids,
    so such a validation set shares slides with training and its numbers are optimistic.
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
