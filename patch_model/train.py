"""The article's recipe: a PCam patch classifier trained with fastai, exported as a model package.

:func:`train_model` runs it for a :class:`TrainConfig`: DataLoaders (:mod:`patch_model.loaders`,
augmentation in :mod:`patch_model.augment`), ``vision_learner`` on a backbone
(:mod:`patch_model.archs`), ``lr_find`` + ``fit_one_cycle`` body frozen, then unfrozen with
discriminative rates, the best epoch kept (:mod:`patch_model.callbacks`), plots and Grad-CAM
(:mod:`patch_model.reports`), then :func:`patch_model.export.export_learner`. The steps, the
outputs and the multi-GPU path are described in docs/training.md.

The names that lived here before the split (``resolve_arch``, ``build_dataloaders``,
``build_learner``, ``gradcam``, ``DihedralBatch``, ...) are re-exported, so old imports work.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from patch_model._fastai import (
    Callback,
    ChannelsLast,
    Learner,
    MixedPrecision,
    fastai,
    num_distrib,
    rank_distrib,
    set_seed,
    valley,
)
from patch_model.archs import (
    ARCH_SOURCES,
    ArchSpec,
    MissingWeightsError,
    build_learner,
    check_pretrained_cached,
    resolve_arch,
)
from patch_model.augment import (
    AUGMENTS,
    SYMMETRIES,
    DihedralBatch,
    HedJitterBatch,
    ResizeBatch,
    describe_augment,
    hed_jitter,
    parse_augment,
)
from patch_model.callbacks import History, KeepBest, finite_or_none
from patch_model.data import CLASS_NAMES, PCAM_PATCH_PX, TUMOR_INDEX, check_split_fractions, detect_layout, open_splits
from patch_model.export import export_learner, learner_config
from patch_model.finetune import (
    ParentPackage,
    ReplayMix,
    check_parent,
    init_from_parent,
    lineage,
    read_parent,
    replay_count,
)
from patch_model.loaders import PatchData, build_dataloaders, labels_of
from patch_model.patch_eval import LEAKY_NOTE, binary_metrics, plot_confusion_matrix
from patch_model.reports import gradcam, plot_losses, plot_lr_find, plot_top_losses_gradcam
from wsi_toolkit.atomic import file_sha256, write_json_atomic
from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.inference import resolve_device
from wsi_toolkit.limits import check_int, check_number
from wsi_toolkit.reliability import temperature_calibration
from wsi_toolkit.runtime.names import TORCH_PRECISIONS, TorchPrecision

__all__ = [
    "CLASS_NAMES",
    "TrainConfig",
    "TrainResult",
    "MissingWeightsError",
    "ArchSpec",
    "resolve_arch",
    "check_pretrained_cached",
    "AUGMENTS",
    "DihedralBatch",
    "HedJitterBatch",
    "hed_jitter",
    "ResizeBatch",
    "PatchData",
    "build_dataloaders",
    "build_learner",
    "gradcam",
    "train_model",
]

# Re-exported for imports from before the split (not in __all__: their homes are the modules above).
_REEXPORTED = (ARCH_SOURCES, SYMMETRIES)

logger = logging.getLogger(__name__)

Monitor = Literal["roc_auc_score", "valid_loss", "accuracy"]
_MONITORS = ("roc_auc_score", "valid_loss", "accuracy")


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; the defaults are the article's recipe.

    ``size``: model input side in px (224: patches upsampled from 96 as in the article; 96 =
    native). ``pretrained``: ImageNet body from torch's local cache (never downloaded);
    ``weights``: a state_dict ``.pth`` for the body instead. ``epochs_frozen``/``epochs``: the
    one-cycle fits with the body frozen, then unfrozen. ``lr``/``lr_unfrozen``: the frozen fit's
    rate and the unfrozen fit's ``lr_max`` (``slice(lr_max/10, lr_max)``); None = ``lr_find``'s
    valley. ``lr_find_iters``: None = fastai's 100, or two epochs' worth of batches (at least 50)
    when that is fewer (tiny data sets); ``0`` skips lr_find (then ``lr`` is needed; ``lr_unfrozen`` defaults to
    ``lr / 10``). ``valid_fraction``/``seed`` also make the (leaky) random split of a Kaggle folder.
    ``workers=None``: ``min(8, cpus - 1)`` loader processes. ``precision="auto"``: mixed precision
    (bf16 where supported, else fp16) on CUDA, fp32 elsewhere. ``calibrate``: after training, fit a
    temperature on the kept epoch's valid logits (minimum NLL) and record it in the package
    (``wsi_toolkit.calibration``), which every inference path then applies.
    ``init_from``: fine-tune, starting from this model package's weights (body and head; same
    ``arch`` and ``size``; :mod:`patch_model.finetune`); ``replay``: a patch folder (the parent's data)
    whose training patches are mixed into the training split, ``replay_fraction`` of the mix.
    """

    data: Path
    out: Path
    arch: str = "resnet50"
    size: int = 224
    pretrained: bool = True
    weights: Path | None = None
    epochs_frozen: int = 2
    epochs: int = 4
    batch_size: int = 128
    lr: float | None = None
    lr_unfrozen: float | None = None
    wd: float = 1e-2
    seed: int = 42
    valid_fraction: float = 0.1
    test_fraction: float = 0.0
    augment: str = "dihedral"
    monitor: Monitor = "roc_auc_score"
    lr_find_iters: int | None = None
    workers: int | None = None
    device: str = "auto"
    precision: TorchPrecision = "auto"
    top_losses: int = 9
    overwrite: bool = False
    progress: bool = True
    calibrate: bool = True
    init_from: Path | None = None
    replay: Path | None = None
    replay_fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        for name in ("weights", "init_from", "replay"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(isinstance(self.arch, str) and bool(self.arch.strip()), f"arch must be a model name; got {self.arch!r}")
        check_int(self.size, "size", bounds=(16, 1024), unit="px")
        check_int(self.epochs_frozen, "epochs_frozen", minimum=0)
        check_int(self.epochs, "epochs", minimum=0)
        need(self.epochs_frozen + self.epochs > 0, "epochs_frozen + epochs must be > 0 (nothing to train)")
        check_int(self.batch_size, "batch_size", minimum=2)  # BatchNorm needs two
        for name in ("lr", "lr_unfrozen"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, positive=True)
        check_number(self.wd, "wd", bounds=(0.0, math.inf))
        check_int(self.seed, "seed", minimum=None)
        check_split_fractions(self.valid_fraction, self.test_fraction)
        parse_augment(self.augment)
        need(self.monitor in _MONITORS, f"monitor must be one of {_MONITORS}; got {self.monitor!r}")
        if self.lr_find_iters is not None:
            iters = check_int(self.lr_find_iters, "lr_find_iters", minimum=0)
            need(iters == 0 or iters >= 6,
                 f"lr_find_iters must be None (auto), 0 (skip lr_find) or >= 6; got {iters!r}")
        need(self.lr_find_iters != 0 or self.lr is not None or self.epochs_frozen == 0,
             "lr_find is off (lr_find_iters=0): pass --lr for the frozen fit")
        need(self.lr_find_iters != 0 or self.lr is not None or self.lr_unfrozen is not None,
             "lr_find is off (lr_find_iters=0): pass --lr-unfrozen (or --lr) for the unfrozen fit")
        if self.workers is not None:
            check_int(self.workers, "workers", minimum=0)
        need(self.precision in TORCH_PRECISIONS, f"precision must be one of {TORCH_PRECISIONS}; got {self.precision!r}")
        check_int(self.top_losses, "top_losses", minimum=0)
        need(not (self.weights is not None and not self.pretrained),
             "--weights FILE and --no-pretrained contradict each other; pass one of them")
        if self.weights is not None:
            need(self.weights.is_file(), f"weights file {self.weights} does not exist")
        need(not (self.weights is not None and self.init_from is not None),
             "--weights FILE and --init-from PACKAGE both initialise the model; pass one of them")
        if self.init_from is not None:
            need(self.init_from.is_dir(), f"--init-from {self.init_from}: no such model package folder")
        if self.replay is not None:
            need(self.replay.is_dir(), f"--replay {self.replay}: no such patch folder (PCam HDF5 or Kaggle layout)")
        check_number(self.replay_fraction, "replay_fraction", bounds=(0.0, 1.0))
        need(self.replay_fraction < 1, f"replay_fraction must be in [0, 1); got {self.replay_fraction!r}")
        resolve_device(self.device)  # validates

    def n_workers(self) -> int:
        if self.workers is not None:
            return int(self.workers)
        return max(0, min(8, (os.cpu_count() or 1) - 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "out", "weights", "init_from", "replay"):
            d[k] = None if d[k] is None else str(d[k])
        return d


@dataclass
class TrainResult:
    """What :func:`train_model` produced: the output folder, the model package and the metrics."""

    out: Path
    package: Path
    metrics: dict
    settings: dict
    seconds: float


# --------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def _log_to(path: Path | None):
    """Send this package's and wsi_toolkit's INFO logs (and fastai's warnings) to ``path``."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    names = ("patch_model", "wsi_toolkit", "py.warnings")
    saved = {}
    for n in names:
        lg = logging.getLogger(n)
        saved[n] = lg.level
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for n in names:
            lg = logging.getLogger(n)
            lg.removeHandler(handler)
            lg.setLevel(saved[n])
        handler.close()


def _precision(device: torch.device, precision: str) -> str:
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise ConfigError(f"precision {precision} needs CUDA; the device here is {device}")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def _data_summary(root: Path) -> dict:
    """``patches_summary.json`` written by ``wsi-patches`` next to the data, if any."""
    path = root / "patches_summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("%s unreadable (%s); training-data provenance is incomplete", path, e)
        return {}


def _lr_find(learn: Learner, iters: int) -> tuple[float, list[float], list[float]]:
    """fastai's ``lr_find`` and its ``valley`` suggestion; returns (lr, lrs, smoothed losses).

    fastai drops the first tenth and the last 5 points before ``valley``; when the loss diverged
    early that leaves nothing (an IndexError inside fastai), so the suggestion is computed here
    from what the finder recorded, dropping fewer points when there are few.
    """
    learn.lr_find(num_it=iters, show_plot=False, suggest_funcs=None)
    lrs = [float(v) for v in learn.recorder.lrs]
    losses = [float(v) for v in learn.recorder.losses]
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    n = finite[-1] + 1 if finite else 0
    lo, hi = iters // 10, n - 5
    if hi - lo < 3:
        lo, hi = 0, max(n - 1, 0)
    if hi - lo < 2:
        raise WsiToolkitError(f"lr_find recorded only {n} usable points (the loss diverged at once); pass "
                              "--lr / --lr-unfrozen or raise --lr-find-iters")
    lr, _ = valley(torch.tensor(lrs[lo:hi]), torch.tensor(losses[lo:hi]), iters)
    return float(lr), lrs, losses


def _split_counts(ds) -> dict:
    labels = labels_of(ds)
    return {"n": int(len(labels)), "n_tumor": int(labels.sum()), "leaky": bool(getattr(ds, "leaky", False)),
            "description": str(getattr(ds, "description", type(ds).__name__))}


def train_model(config: TrainConfig) -> TrainResult:
    """Run the recipe on ``config.data``; write everything into ``config.out``.

    Outputs: ``model/`` (the model package ``wsi-infer`` loads), ``metrics.json``,
    ``settings.json``, ``train.log``, ``lr_find_frozen.png``, ``lr_find_unfrozen.png``,
    ``losses.png``, ``confusion_matrix.png``, ``top_losses_gradcam.png``, ``checkpoints/best.pth``
    (fastai's state of the best epoch). Under ``torchrun`` only rank 0 writes.
    """
    t_start = time.perf_counter()
    world, rank = num_distrib(), rank_distrib()
    is_main = rank == 0
    out = config.out
    package_dir = out / "model"
    if package_dir.exists() and any(package_dir.iterdir()) and not config.overwrite:
        raise ConfigError(f"{package_dir} already holds a model package; pass --overwrite or another --out")
    spec = resolve_arch(config.arch)
    parent = None
    if config.init_from is not None:
        parent = read_parent(config.init_from)
        check_parent(parent, arch=spec.name, size=config.size, class_names=CLASS_NAMES)
    elif config.pretrained and config.weights is None:
        check_pretrained_cached(spec)  # fail before anything is read
    if world > 1 and (config.lr is None or config.lr_unfrozen is None):
        raise ConfigError("under torchrun/accelerate (WORLD_SIZE > 1) pass --lr and --lr-unfrozen: lr_find would "
                          "run differently on each rank; take them from a single-GPU run's lr_find plots")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    world_env = os.environ.get("WORLD_SIZE")
    try:
        with _log_to(out / "train.log" if is_main else None):
            return _train(config, spec, world=world, rank=rank, t_start=t_start, parent=parent)
    finally:
        if world_env is not None:
            os.environ["WORLD_SIZE"] = world_env


@dataclass
class _Run:
    """One run's fixed facts: its settings, architecture, device, precision and place among the ranks."""

    config: TrainConfig
    spec: ArchSpec
    device: torch.device
    precision: str
    workers: int
    world: int
    rank: int
    t_start: float
    parent: ParentPackage | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return self.config.out


@dataclass
class _Data:
    """The splits, what they hold and the DataLoaders built on them."""

    layout: str
    splits: dict[str, Any]
    leaky: bool
    counts: dict[str, dict]
    summary: dict
    loaders: PatchData
    lineage_data: list[dict[str, Any]] = field(default_factory=list)

    @property
    def synthetic(self) -> bool:
        return bool(self.summary.get("synthetic", False))


@dataclass
class _Fit:
    """What the two one-cycle phases left: the kept epoch, the history, the rates and their plots."""

    keep_best: KeepBest
    history: History
    lr_iters: int
    n_batches: int
    lr_info: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Eval:
    """The kept epoch's predictions on valid (probabilities, targets, losses, logits) and the metrics."""

    probs: np.ndarray
    targs: np.ndarray
    losses: np.ndarray
    valid: dict[str, Any]
    test: dict[str, Any] | None
    logits: np.ndarray | None = None


def _train(config: TrainConfig, spec: ArchSpec, *, world: int, rank: int, t_start: float,
           parent: ParentPackage | None = None) -> TrainResult:
    run = _start(config, spec, world=world, rank=rank, t_start=t_start)
    run.parent = parent
    data = _open_data(run)
    learn = _make_learner(run, data.loaders)
    dist_ctx = ((lambda: _distributed(learn, run.device)) if world > 1 else contextlib.nullcontext)
    bar_ctx = (lambda: _quiet(learn)) if not config.progress else contextlib.nullcontext
    fit = _Fit(KeepBest(config.monitor), History(), lr_iters=_lr_iters(run, data.loaders),
               n_batches=len(data.loaders.dls.train))
    t_fit = time.perf_counter()
    with bar_ctx(), dist_ctx():
        if config.epochs_frozen > 0:
            _fit_frozen(run, learn, fit)
        if config.epochs > 0:
            _fit_unfrozen(run, learn, fit)
    fit.seconds = time.perf_counter() - t_fit
    learn.model.eval()
    if world > 1:
        _leave_distributed(run, learn)
    if not run.is_main:
        return TrainResult(out=run.out, package=run.out / "model", metrics={}, settings={},
                           seconds=time.perf_counter() - t_start)
    ev = _evaluate(learn, data, bar_ctx)
    rows = _diagnostic_plots(run, learn, data, fit, ev)
    settings, metrics, extra = _records(run, learn, data, fit, ev, rows)
    if config.calibrate:
        extra["calibration"] = metrics["calibration"] = _fit_calibration(data, ev)
    package_dir = run.out / "model"
    cfg = learner_config(learn, arch=spec.name, size=config.size, mean=spec.mean, std=spec.std, extra=extra)
    export_learner(learn, package_dir, config=cfg, overwrite=config.overwrite)
    metrics["export_parity_max_abs_diff"] = _check_export(run, package_dir, data, ev)
    metrics["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    write_json_atomic(run.out / "metrics.json", metrics)
    write_json_atomic(run.out / "settings.json", settings)
    logger.info("done in %.1f s: valid accuracy %.4f, ROC AUC %s%s", metrics["seconds"]["total"],
                ev.valid["accuracy"], ev.valid["roc_auc"], " (LEAKY)" if data.leaky else "")
    return TrainResult(out=run.out, package=package_dir, metrics=metrics, settings=settings,
                       seconds=time.perf_counter() - t_start)


def _start(config: TrainConfig, spec: ArchSpec, *, world: int, rank: int, t_start: float) -> _Run:
    """The device (this rank's GPU under DDP), the precision it trains in, the seed set."""
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    run = _Run(config, spec, device, _precision(device, config.precision), config.n_workers(), world, rank, t_start)
    logger.info("pcam-train: %s (%s) on %s, %s, data %s -> %s", spec.name, spec.source, device, run.precision,
                config.data, run.out)
    set_seed(config.seed, reproducible=True)
    return run


def _open_data(run: _Run) -> _Data:
    """The train/valid(/test) splits, checked (valid holds both classes), and their DataLoaders."""
    config = run.config
    layout = detect_layout(config.data)
    splits = open_splits(config.data, valid_fraction=config.valid_fraction, seed=config.seed,
                         test_fraction=config.test_fraction)
    leaky = bool(getattr(splits["valid"], "leaky", False))
    if leaky:
        logger.warning("validation numbers of this run are %s", LEAKY_NOTE)
    summary = _data_summary(config.data)
    lineage_data = [_data_entry(config.data, len(splits["train"]), "new", summary)]
    if config.replay is not None:
        splits["train"], entry = _with_replay(run, splits["train"])
        lineage_data.append(entry)
    counts = {name: _split_counts(ds) for name, ds in splits.items()}
    for name, c in counts.items():
        logger.info("%s: %s", name, c["description"])
    valid_labels = labels_of(splits["valid"])
    if len(np.unique(valid_labels)) < 2:
        only = CLASS_NAMES[int(valid_labels[0])] if len(valid_labels) else "-"
        raise ConfigError(f"the valid split holds only class {only}"
                          f"; ROC AUC and the best-epoch choice need both classes")
    loaders = build_dataloaders(splits, size=config.size, mean=run.spec.mean, std=run.spec.std,
                                batch_size=config.batch_size, device=run.device, workers=run.workers,
                                augment=config.augment)
    return _Data(layout, splits, leaky, counts, summary, loaders, lineage_data)


def _data_entry(root: Path, n: int, role: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One ``lineage.data`` row: the folder, the training patches taken from it and their role; for a
    ``wsi-patches --reviews`` set, each slide's review version and sha256."""
    entry: dict[str, Any] = {"path": str(root.resolve()), "n_patches": int(n), "role": role}
    reviews = {stem: {k: s["review"][k] for k in ("version", "sha256")}
               for stem, s in (summary.get("slides") or {}).items() if isinstance(s, dict) and s.get("review")}
    if reviews:
        entry["reviews"] = reviews
    return entry


def _with_replay(run: _Run, train: Any) -> tuple[ReplayMix, dict[str, Any]]:
    """The new training split with old patches mixed in, and its lineage row. The old set is split as
    the parent's recipe split it when the parent was trained on it (a Kaggle folder's random split:
    its held-back patches stay out of the mix), else with this run's settings."""
    config = run.config
    old_root = Path(config.replay)
    recipe = dict(run.parent.recipe) if run.parent is not None else {}
    same = run.parent is not None and run.parent.training_data is not None and \
        Path(run.parent.training_data).resolve() == old_root.resolve()
    split = {"valid_fraction": recipe.get("valid_fraction", config.valid_fraction) if same else config.valid_fraction,
             "test_fraction": recipe.get("test_fraction", config.test_fraction) if same else config.test_fraction,
             "seed": recipe.get("seed", config.seed) if same else config.seed}
    old_train = open_splits(old_root, **split)["train"]
    n = replay_count(len(train), config.replay_fraction, len(old_train))
    mixed = ReplayMix(train, old_train, n, seed=config.seed, old_name=str(old_root))
    logger.info("replay: %s", mixed.description)
    entry = {"path": str(old_root.resolve()), "n_patches": n, "role": "replay", "of": len(old_train),
             "fraction": float(config.replay_fraction), "split": split}
    return mixed, entry


def _make_learner(run: _Run, loaders: PatchData) -> Learner:
    """``vision_learner`` on the backbone, with mixed precision, channels-last and DDP callbacks where they apply."""
    config, spec = run.config, run.spec
    learn = build_learner(loaders, spec, pretrained=config.pretrained and run.parent is None, weights=config.weights,
                          wd=config.wd, path=run.out)
    if run.parent is not None:
        init_from_parent(learn.model, run.parent)
        learn.body_init = "package"
    if run.precision != "fp32":
        learn.add_cb(MixedPrecision(amp_mode=run.precision))
    if run.device.type == "cpu" and spec.weights_wheel:
        # EfficientNet's depthwise convolutions train ~2x faster on a CPU in channels-last memory
        # (measured: lite0, 96 px, batch 64: 1.35 -> 0.69 s per step; docs/training.md).
        learn.add_cb(ChannelsLast())
    if run.world > 1:
        try:
            importlib.import_module("fastai.distributed")  # patches Learner.distrib_ctx
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"multi-GPU training needs accelerate (pip install accelerate): {e}") from None
        learn.add_cb(_RankDigest(run.rank, run.world))
    return learn


def _lr_iters(run: _Run, loaders: PatchData) -> int:
    """lr_find's length: --lr-find-iters, else 2 epochs' batches within [50, 100]; 0 under DDP (the
    rates come from --lr / --lr-unfrozen)."""
    if run.world > 1:
        return 0
    n_batches = len(loaders.dls.train)
    given = run.config.lr_find_iters
    return given if given is not None else min(100, max(50, 2 * n_batches))


def _lr_find_phase(run: _Run, learn: Learner, fit: _Fit, phase: str, what: str) -> float:
    """lr_find for ``phase`` (frozen, unfrozen): its plot ``lr_find_<phase>.png`` (rank 0) and its
    valley, recorded in ``fit`` and returned."""
    found, lrs, losses = _lr_find(learn, fit.lr_iters)
    if run.is_main:
        title = f"lr_find, {what} ({run.spec.name}, {run.config.size} px)"
        fit.plots[f"lr_find_{phase}"] = plot_lr_find(lrs, losses, found, run.out / f"lr_find_{phase}.png",
                                                     title=title).name
    fit.lr_info[f"{phase}_lr_find"] = found
    return found


def _fit_frozen(run: _Run, learn: Learner, fit: _Fit) -> None:
    """Body frozen: lr_find (its valley unless --lr), then one cycle of ``epochs_frozen`` epochs."""
    config = run.config
    learn.freeze()
    lr = config.lr
    if fit.lr_iters:
        found = _lr_find_phase(run, learn, fit, "frozen", "body frozen")
        logger.info("lr_find (frozen): valley %.3g%s", found, "" if lr is None else f" (using --lr {lr:g})")
        if lr is None:
            lr = found
    fit.lr_info["frozen"] = float(lr)
    fit.lr_info["frozen_source"] = "--lr" if config.lr is not None else "lr_find valley"
    fit.keep_best.phase = fit.history.phase = "frozen"
    learn.fit_one_cycle(config.epochs_frozen, lr, cbs=[fit.keep_best, fit.history])


def _fit_unfrozen(run: _Run, learn: Learner, fit: _Fit) -> None:
    """Unfrozen: lr_find again (its valley unless --lr-unfrozen), then one cycle of ``epochs`` with
    discriminative rates ``slice(lr_max / 10, lr_max)``."""
    config = run.config
    learn.unfreeze()
    lr_max = config.lr_unfrozen
    if fit.lr_iters:
        found = _lr_find_phase(run, learn, fit, "unfrozen", "unfrozen")
        logger.info("lr_find (unfrozen): valley %.3g", found)
        if lr_max is None:
            lr_max = found
    if lr_max is None:  # lr_find off and only --lr given
        lr_max = float(config.lr) / 10
    fit.lr_info["unfrozen"] = [float(lr_max) / 10, float(lr_max)]
    fit.lr_info["unfrozen_source"] = "--lr-unfrozen" if config.lr_unfrozen is not None else (
        "lr_find valley" if fit.lr_iters else "--lr / 10")
    fit.keep_best.phase = fit.history.phase = "unfrozen"
    learn.fit_one_cycle(config.epochs, slice(lr_max / 10, lr_max), cbs=[fit.keep_best, fit.history])


def _leave_distributed(run: _Run, learn: Learner) -> None:
    """After DDP: log this rank's final digest, wait for the others; rank 0 goes on alone."""
    learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, _RankDigest)))
    logger.info("rank %d of %d: final model sha256 %s", run.rank, run.world, state_digest(learn.model))
    torch.distributed.barrier()
    # Rank 0 evaluates and exports alone; fastai gathers predictions over the ranks whenever
    # WORLD_SIZE > 1, so it is 1 from here (train_model puts it back).
    os.environ["WORLD_SIZE"] = "1"


def _evaluate(learn: Learner, data: _Data, bar_ctx: Callable[[], Any]) -> _Eval:
    """The kept (best) epoch on valid, and on test when there is one."""

    def predict(split: str):
        with bar_ctx():  # act=identity: the logits (the loss is computed on them either way)
            logits, targs, losses = learn.get_preds(dl=data.loaders.dl(split), with_loss=True, act=lambda x: x)
        logits = logits.float()
        return (torch.softmax(logits, dim=1).numpy(), targs.numpy().astype(np.int64), losses.float().numpy(),
                logits.numpy())

    v_probs, v_targs, v_losses, v_logits = predict("valid")
    valid_metrics = binary_metrics(v_probs, v_targs, tumor_index=TUMOR_INDEX, class_names=CLASS_NAMES)
    valid_metrics["leaky"] = data.leaky
    test_metrics = None
    if "test" in data.loaders.items:
        t_probs, t_targs, _, _ = predict("test")
        test_metrics = binary_metrics(t_probs, t_targs, tumor_index=TUMOR_INDEX, class_names=CLASS_NAMES)
        test_metrics["leaky"] = bool(getattr(data.splits["test"], "leaky", False))
    return _Eval(v_probs, v_targs, v_losses, valid_metrics, test_metrics, v_logits)


def _diagnostic_plots(run: _Run, learn: Learner, data: _Data, fit: _Fit, ev: _Eval) -> list[dict[str, Any]]:
    """losses.png, confusion_matrix.png and the Grad-CAM of the top valid losses (into ``fit.plots``);
    returns the top losses' rows."""
    out, plots = run.out, fit.plots
    plots["losses"] = plot_losses(fit.history.batches, fit.history.epochs, out / "losses.png").name
    note = " (LEAKY split)" if data.leaky else ""
    plots["confusion_matrix"] = plot_confusion_matrix(
        np.asarray(ev.valid["confusion_matrix"]), CLASS_NAMES, out / "confusion_matrix.png",
        title=f"valid{note}: accuracy {ev.valid['accuracy']:.4f}").name
    k = min(run.config.top_losses, len(ev.losses))
    top = np.argsort(-ev.losses, kind="stable")[:k]
    valid_ds = data.loaders.datasets["valid"]
    top_patches = (np.stack([np.asarray(valid_ds[int(i)][0]) for i in top]) if k
                   else np.zeros((0, PCAM_PATCH_PX, PCAM_PATCH_PX, 3), np.uint8))
    cams = np.zeros((0, 1, 1), np.float32)
    if k:
        x = data.loaders.valid_inputs(top_patches, run.device)
        cams = gradcam(learn.model, x, layer=learn.model[0], class_idx=torch.as_tensor(ev.probs[top].argmax(1)))
    rows = [{"index": int(i), "true": CLASS_NAMES[ev.targs[i]], "pred": CLASS_NAMES[int(ev.probs[i].argmax())],
             "loss": float(ev.losses[i]), "p_tumor": float(ev.probs[i, TUMOR_INDEX])} for i in top]
    plots["top_losses_gradcam"] = plot_top_losses_gradcam(
        top_patches, cams, rows, out / "top_losses_gradcam.png",
        title=f"top {k} valid losses{note}, Grad-CAM of the predicted class").name
    return rows


def _records(run: _Run, learn: Learner, data: _Data, fit: _Fit, ev: _Eval,
             rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(settings.json, metrics.json, the package config's ``extra``: training provenance and headline metrics)."""
    config, spec = run.config, run.spec
    keep_best, history, lr_info = fit.keep_best, fit.history, fit.lr_info
    best_phase, best_epoch = keep_best.best_at or (None, None)
    best_row = next((e for e in history.epochs if (e["phase"], e["epoch"]) == (best_phase, best_epoch)), None)
    settings = {
        **config.to_dict(),
        "resolved": {
            "arch": spec.name, "arch_source": spec.source, "body_init": learn.body_init,
            "weights_file": None if learn.weights_path is None else str(learn.weights_path),
            "weights_sha256": None if learn.weights_path is None else file_sha256(learn.weights_path),
            "weights_wheel": spec.weights_wheel if learn.body_init == "imagenet" else None,
            "init_from_sha256": None if run.parent is None else run.parent.sha256,
            "mean": list(spec.mean), "std": list(spec.std), "device": str(run.device), "precision": run.precision,
            "workers": run.workers, "world_size": max(run.world, 1), "layout": data.layout, "lr": lr_info,
            "lr_find_iters": fit.lr_iters, "train_batches_per_epoch": fit.n_batches,
            "class_names": list(CLASS_NAMES), "tumor_index": TUMOR_INDEX,
            "augmentation": describe_augment(config.augment),
            "resize": f"96 -> {config.size} px, bilinear antialiased (= inference Preprocess)" if config.size != 96
            else "none (native 96 px)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "fastai": fastai.__version__},
        },
    }
    metrics = {
        "leaky": data.leaky,
        "leaky_note": LEAKY_NOTE if data.leaky else None,
        "layout": data.layout,
        "monitor": config.monitor,
        "splits": data.counts,
        "epochs": history.epochs,
        "best": {"phase": best_phase, "epoch": best_epoch,
                 "global_epoch": None if best_row is None else best_row["global_epoch"],
                 config.monitor: finite_or_none(keep_best.best)},
        "valid": ev.valid,
        "test": ev.test,
        "lr": lr_info,
        "top_losses": rows,
        "seconds": {"fit": round(fit.seconds, 2)},
        "plots": fit.plots,
        "synthetic_data": data.synthetic,
        "lineage": lineage(run.parent, data.lineage_data),
    }
    summary = data.summary
    extra = {
        "synthetic": data.synthetic,
        "training": {
            "data": str(config.data.resolve()), "layout": data.layout, "leaky": data.leaky, "splits": data.counts,
            "data_summary": {k: summary[k] for k in ("format", "label", "split_by", "synthetic") if k in summary},
            "recipe": {"arch": spec.name, "arch_source": spec.source, "body_init": learn.body_init,
                       "input_size": config.size, "epochs_frozen": config.epochs_frozen, "epochs": config.epochs,
                       "batch_size": config.batch_size, "wd": config.wd, "lr": lr_info, "seed": config.seed,
                       "valid_fraction": config.valid_fraction, "test_fraction": config.test_fraction,
                       "monitor": config.monitor, "augmentation": config.augment, "precision": run.precision},
            "best": metrics["best"],
        },
        "lineage": metrics["lineage"],
        "metrics": {"valid": _headline(ev.valid),
                    "test": None if ev.test is None else _headline(ev.test),
                    "leaky": data.leaky},
    }
    return settings, metrics, extra


def _fit_calibration(data: _Data, ev: _Eval) -> dict[str, Any]:
    """The temperature minimising the NLL of the kept epoch's valid logits, as the package records it
    (:func:`wsi_toolkit.reliability.temperature_calibration`)."""
    assert ev.logits is not None
    leaky = " (LEAKY random split)" if data.leaky else ""
    cal = temperature_calibration(ev.logits, ev.targs, tumor_index=TUMOR_INDEX,
                                  fitted_on=f"valid split{leaky}, n={len(ev.targs)}, after training (pcam-train)")
    logger.info("temperature %.4g fitted on valid (NLL %.4f -> %.4f, ECE %.4f -> %.4f)%s", cal["temperature"],
                cal["nll_before"], cal["nll_after"], cal["ece_before"], cal["ece_after"],
                "; at its bound: valid is separated perfectly or nearly" if cal.get("at_bound") else "")
    return cal


def _check_export(run: _Run, package_dir: Path, data: _Data, ev: _Eval) -> float:
    """The exported package through the inference path against the learner on valid patches: max |dp|
    (a warning above the precision's tolerance). Both at the package's temperature."""
    from wsi_toolkit.model_package import load_model_package, probabilities

    pkg = load_model_package(package_dir)
    valid_ds = data.loaders.datasets["valid"]
    n_chk = min(64, len(valid_ds))
    chk = np.stack([np.asarray(valid_ds[i][0]) for i in range(n_chk)])
    want = (ev.probs[:n_chk] if ev.logits is None
            else probabilities(torch.from_numpy(ev.logits[:n_chk]), pkg.temperature).numpy())
    diff = float(np.abs(pkg.predict_class_proba(torch.from_numpy(chk)).numpy() - want).max())
    tol = 1e-4 if run.precision == "fp32" else 2e-2
    if diff > tol:
        logger.warning("exported package and learner disagree by %.3g on valid patches (tolerance %g)", diff, tol)
    else:
        logger.info("exported package matches the learner on %d valid patches (max |dp| %.2e)", n_chk, diff)
    return diff


def state_digest(model: torch.nn.Module, *, parameters_only: bool = False) -> str:
    """sha256 of a model's weights (``parameters_only``) or whole ``state_dict``, in key order."""
    h = hashlib.sha256()
    items = model.named_parameters() if parameters_only else model.state_dict().items()
    for name, t in items:
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class _RankDigest(Callback):
    """Under DDP, logs each rank's weight digest after every epoch: they must agree (averaged
    gradients). BatchNorm statistics are left out (per rank on the CPU: no SyncBatchNorm)."""

    order = 90

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def after_epoch(self):
        model = getattr(self.learn.model, "module", self.learn.model)
        logger.info("rank %d of %d, epoch %d: weights sha256 %s", self.rank, self.world, self.epoch + 1,
                    state_digest(model, parameters_only=True))


@contextlib.contextmanager
def _distributed(learn: Learner, device: torch.device):
    """fastai's ``distrib_ctx`` (DDP through accelerate), also on the CPU (gloo): there fastai would
    move its index broadcast to CUDA and convert BatchNorm to SyncBatchNorm (GPU only), so the CPU
    path uses a loader that broadcasts CPU tensors and keeps plain BatchNorm (DDP still sends rank
    0's BatchNorm buffers to the others before every training step)."""
    if device.type != "cpu":
        with learn.distrib_ctx():
            yield
        return
    from fastai.callback.progress import ProgressCallback
    from fastai.distributed import DistributedDL, DistributedTrainer

    class _GlooDL(DistributedDL):
        def _broadcast(self, t, rank):
            t = torch.LongTensor(t)
            torch.distributed.broadcast(t, rank)
            return t.tolist()

    class _GlooTrainer(DistributedTrainer):
        def _wrap_dl(self, dl):
            return dl if isinstance(dl, DistributedDL) else _GlooDL(dl, device=torch.device("cpu"))

    learn.add_cb(_GlooTrainer(sync_bn=False, cpu=True))
    if rank_distrib():
        learn.remove_cb(ProgressCallback)
    try:
        yield
    finally:
        learn.remove_cb(_GlooTrainer)


@contextlib.contextmanager
def _quiet(learn: Learner):
    """No progress bars and no printed epoch table (the epochs still go to the log)."""
    with learn.no_bar(), learn.no_logging():
        yield


def _headline(m: Mapping[str, Any]) -> dict:
    return {k: m[k] for k in ("n", "accuracy", "roc_auc", "leaky") if k in m}
