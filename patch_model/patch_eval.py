"""``pcam-eval``: a model package on one split of a patch set, through the inference path.

The package is loaded with :func:`wsi_toolkit.model_package.load_model_package` and patches go
through its :class:`~wsi_toolkit.model_package.Preprocess`, exactly as in ``wsi-infer``; so these
numbers are the numbers of the model that runs on slides, not of a training-time learner.

``tta=True`` averages the class probabilities over the 8 dihedral views of each patch
(identity, flips, 90-degree rotations): tissue has no orientation.

``runtime="openvino"`` runs the model with OpenVINO on the CPU (:mod:`wsi_toolkit.runtime`) at
``precision`` fp32, bf16 or int8: the accuracy of the model as that runtime computes it. INT8 is
calibrated on patches of the ``train`` split of the same data, or of ``calibration`` (a PCam folder).

Outputs (``out``, default ``PACKAGE/eval_<split>/``): ``eval.json`` (accuracy, ROC AUC,
confusion matrix, counts, leaky flag) and ``roc.png``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from wsi_toolkit import plots
from wsi_toolkit.atomic import write_json_atomic
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.inference import resolve_device
from wsi_toolkit.limits import check_int
from wsi_toolkit.model_package import ModelConfig, load_model_package

__all__ = [
    "LEAKY_NOTE",
    "binary_metrics",
    "dihedral_views",
    "EvalResult",
    "evaluate_package",
    "plot_confusion_matrix",
    "plot_roc",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]

#: What a leaky number means, in plain words (metrics.json, eval.json, the console).
LEAKY_NOTE = (
    "LEAKY: the Kaggle layout has no slide ids, so this validation split is random and patches of the "
    "same slides (and overlapping patches) are in both train and valid; these numbers are optimistic. "
    "Use PCam's slide-disjoint valid/test splits for honest numbers."
)


# --------------------------------------------------------------------------------------------
# Pure functions


def binary_metrics(probs: np.ndarray, labels: np.ndarray, *, tumor_index: int = 1,
                   class_names: Sequence[str] = ("notumor", "tumor")) -> dict[str, Any]:
    """Accuracy, ROC AUC of P(tumour), confusion matrix and counts.

    ``probs``: float ``(N, C)`` class probabilities; ``labels``: int ``(N,)`` class indices.
    ``confusion_matrix[i][j]``: patches of true class ``i`` predicted ``j`` (prediction = argmax).
    ``roc_auc`` is None when only one class is present.
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ConfigError(f"probs must be (N, C) with N = len(labels) = {len(labels)}; got {probs.shape}")
    pred = probs.argmax(1)
    n_cls = probs.shape[1]
    cm = confusion_matrix(labels, pred, labels=list(range(n_cls))) if len(labels) else np.zeros((n_cls, n_cls), int)
    is_tumor = labels == tumor_index
    auc = None
    if len(labels) and 0 < is_tumor.sum() < len(labels):
        auc = float(roc_auc_score(is_tumor, probs[:, tumor_index]))
    tp = int(cm[tumor_index, tumor_index])
    pos = int(cm[tumor_index].sum())
    neg_idx = [i for i in range(n_cls) if i != tumor_index]
    tn = int(cm[np.ix_(neg_idx, neg_idx)].sum())
    neg = int(cm[neg_idx].sum())
    return {
        "n": int(len(labels)),
        "n_tumor": int(is_tumor.sum()),
        "accuracy": float((pred == labels).mean()) if len(labels) else None,
        "roc_auc": auc,
        "sensitivity": tp / pos if pos else None,
        "specificity": tn / neg if neg else None,
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": list(class_names),
    }


def dihedral_views(patches: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views (the symmetries of the square) of ``(N, H, W, C)`` patches (H == W):
    identity, the flips and the 90-degree rotations, as exact index permutations."""
    if patches.ndim != 4 or patches.shape[1] != patches.shape[2]:
        raise ConfigError(f"dihedral views need square (N, H, W, C) patches; got {tuple(patches.shape)}")
    out = []
    for transposed in (patches, patches.transpose(1, 2)):
        for dims in ((), (1,), (2,), (1, 2)):
            out.append(transposed.flip(dims) if dims else transposed)
    return out


# --------------------------------------------------------------------------------------------
# Plots (wsi_toolkit.plots: matplotlib's object API on the Agg canvas, written atomically)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, *,
                          title: str = "") -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts and row fractions."""
    cm = np.asarray(cm)
    fig = plots.new_figure((4.6, 4.0), layout="constrained")
    ax = fig.add_subplot()
    row = cm.sum(1, keepdims=True).clip(min=1)
    ax.imshow(cm / row, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            frac = cm[i, j] / row[i, 0]
            ax.text(j, i, f"{cm[i, j]}\n{frac:.1%}", ha="center", va="center",
                    color="white" if frac > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=9)
    return plots.save_figure(fig, path)


def plot_roc(scores: np.ndarray, is_tumor: np.ndarray, path: str | os.PathLike, *, title: str = "") -> Path:
    """ROC curve of P(tumour) ``scores`` against boolean ``is_tumor``, written atomically."""
    return plots.plot_roc(scores, is_tumor, path, title=title or "ROC",
                          xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
                          one_class_note="one class only: no ROC", auc_digits=4, figsize=(4.6, 4.4))


# --------------------------------------------------------------------------------------------
# The job


@dataclass
class EvalResult:
    """Metrics of a package on one split; ``probs`` float32 ``(N, C)``, ``labels`` int64 ``(N,)``."""

    package: Path
    data: Path
    split: str
    tta: bool
    leaky: bool
    metrics: dict
    probs: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    seconds: float = 0.0
    out: Path | None = None
    runtime: dict = field(default_factory=lambda: {"runtime": "torch"})

    def to_dict(self) -> dict:
        return {
            "package": str(self.package), "data": str(self.data), "split": self.split, "tta": self.tta,
            "tta_views": 8 if self.tta else 1, "leaky": self.leaky,
            "leaky_note": LEAKY_NOTE if self.leaky else None,
            **self.metrics, "seconds": round(self.seconds, 3), "runtime": self.runtime,
        }


def _collate(batch):
    return (torch.from_numpy(np.stack([np.asarray(b[0]) for b in batch])),
            torch.as_tensor([int(b[1]) for b in batch], dtype=torch.int64))


def package_splits(config: ModelConfig, data: str | os.PathLike, *, valid_fraction: float | None = None,
                   seed: int | None = None) -> dict:
    """The splits of the patch set at ``data`` as the package was trained on them: for a Kaggle
    folder the random valid (and test) parts are rebuilt with the training recipe's
    ``valid_fraction``, ``seed`` and ``test_fraction`` (from the package's config) unless given."""
    from patch_model.data import open_splits

    recipe = (config.extra.get("training") or {}).get("recipe") or {}
    vf = valid_fraction if valid_fraction is not None else recipe.get("valid_fraction", 0.1)
    sd = seed if seed is not None else recipe.get("seed", 42)
    return open_splits(data, valid_fraction=vf, seed=sd, test_fraction=recipe.get("test_fraction", 0.0))


def evaluate_package(
    package: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: Split = "test",
    tta: bool = False,
    batch_size: int = 128,
    device: str = "auto",
    workers: int = 0,
    valid_fraction: float | None = None,
    seed: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    runtime: str = "torch",
    precision: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    ov_preprocess: Literal["graph", "torch"] = "graph",
) -> EvalResult:
    """Evaluate the model package at ``package`` on ``split`` of the patch set at ``data``.

    Writes ``eval.json`` and ``roc.png`` into ``out`` (default ``PACKAGE/eval_<split>/``).
    For a Kaggle folder the random
    valid split is rebuilt with ``valid_fraction``/``seed`` (default: those the package was
    trained with, from its config) and its numbers are labelled leaky.
    ``runtime``/``precision``: see the module docstring (torch runs fp32 here: ``auto`` or ``fp32``).
    ``ov_preprocess``: OpenVINO with the preprocessing in its graph (``graph``) or in torch (``torch``).
    """
    from wsi_toolkit.runtime import calibration_from_dataset, calibration_from_pcam, select_runtime

    t0 = time.perf_counter()
    batch_size = check_int(batch_size, "batch_size")
    dev = resolve_device(device)
    pkg = load_model_package(package, device=dev)
    cfg = pkg.config
    if cfg.num_classes < 2:
        raise ConfigError(f"pcam-eval needs a classifier with >= 2 classes; {package} has {cfg.num_classes}")
    splits = package_splits(cfg, data, valid_fraction=valid_fraction, seed=seed)
    if split not in splits:
        raise ConfigError(f"{data} has no {split!r} split (has {sorted(splits)}); pick one with --split")
    ds = splits[split]
    leaky = bool(getattr(ds, "leaky", False))
    if leaky:
        logger.warning("%s split %r: %s", data, split, LEAKY_NOTE)
    tumor = cfg.tumor_index()

    def make_calibration():
        if calibration is not None:
            return calibration_from_pcam(calibration)
        return calibration_from_dataset(splits["train"], source=f"{Path(data).name} train split")

    # A set, not a function: its fingerprint keys the graph (a function would be wsi-infer's automatic
    # calibration on slide tissue, one graph per package).
    choice = select_runtime(pkg, runtime=runtime, precision=precision, device=dev, cache_dir=cache_dir,
                            calibration=make_calibration() if precision == "int8" else None,
                            preprocess=ov_preprocess)
    if choice.model is None and choice.precision not in ("auto", "fp32"):
        raise ConfigError(f"pcam-eval runs torch in fp32; precision {choice.precision} needs --runtime openvino")
    predict = choice.model.predict_class_proba if choice.model is not None else pkg.predict_class_proba
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=int(workers),
                                         collate_fn=_collate)
    probs, labels = [], []
    with tqdm(total=len(ds), desc=f"pcam-eval {split}{' +TTA' if tta else ''}", unit="patch",
              disable=not progress or None, leave=False) as bar:
        for x, y in loader:
            views = dihedral_views(x) if tta else [x]
            p = torch.stack([torch.as_tensor(np.asarray(predict(v))) for v in views]).mean(0)
            probs.append(p.numpy())
            labels.append(y.numpy())
            bar.update(len(y))
    probs_a = np.concatenate(probs) if probs else np.zeros((0, cfg.num_classes), np.float32)
    labels_a = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    metrics = binary_metrics(probs_a, labels_a, tumor_index=tumor, class_names=cfg.class_names)
    result = EvalResult(package=Path(package), data=Path(data), split=split, tta=tta, leaky=leaky, metrics=metrics,
                        probs=probs_a.astype(np.float32), labels=labels_a, seconds=time.perf_counter() - t0,
                        runtime=choice.info)
    out_dir = Path(out) if out is not None else Path(package) / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    label = f"{split}{' (LEAKY)' if leaky else ''}{', 8-view TTA' if tta else ''}"
    acc = metrics["accuracy"]
    plot_roc(probs_a[:, tumor] if len(probs_a) else np.zeros(0), labels_a == tumor, out_dir / "roc.png",
             title=f"{Path(package).name} on {label}: accuracy {acc:.4f}" if acc is not None else label)
    write_json_atomic(out_dir / "eval.json", result.to_dict())
    result.out = out_dir
    return result

