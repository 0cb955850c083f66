"""``pcam-eval``: a model package on one split of a patch set, through the inference path.

The package is loaded with :func:`wsi_toolkit.model_package.load_model_package` and patches go
through its :class:`~wsi_toolkit.model_package.Preprocess`, exactly as in ``wsi-infer``; so these
numbers are the numbers of the model that runs on slides, not of a training-time learner.

``tta=True`` averages the class probabilities over the 8 dihedral views of each patch
(identity, flips, 90-degree rotations): tissue has no orientation.

``mc_dropout=K`` (K >= 2) is Monte-Carlo dropout instead
(:mod:`wsi_toolkit.inference.mc_dropout`, as ``wsi-infer --mc-dropout``): the package's body runs
once per patch and its head K times with its dropout layers sampled (masks seeded by
``mc_dropout_seed`` and the patch's index in the split); the prediction is the mean of the K
samples' probabilities and ``"mc_dropout_spread"`` their standard deviation, so MC-dropout and TTA
are scored on the same patches by the same metrics. Torch only; not with ``tta`` or
``fit_temperature``.

``runtime="openvino"`` runs the model with OpenVINO on the CPU (:mod:`wsi_toolkit.runtime`) at
``precision`` fp32, bf16 or int8: the accuracy of the model as that runtime computes it. INT8 is
calibrated on patches of the ``train`` split of the same data, or of ``calibration`` (a PCam folder).

Probabilities are the package's: its logits divided by its fitted temperature
(``wsi_toolkit.calibration`` in ``config.json``; 1 when it has none), per view before the TTA mean.
``fit_temperature=True`` first fits the temperature on the split's single-view (identity) logits
(:func:`wsi_toolkit.reliability.temperature_calibration`) and records it in the package's
``config.json`` (:func:`wsi_toolkit.model_package.set_calibration`): fit on ``valid``, then evaluate
``test``, or the "after" numbers are measured on the patches the temperature was fitted to.

Calibration and selective prediction (:mod:`wsi_toolkit.reliability`): the ECE of P(tumour) over
15 equal-width bins of [0, 1] (and Guo et al.'s top-label ECE), with and without the temperature;
the accuracy when the 5, 10 and 20 % most uncertain patches are referred, the risk-coverage curve
and the ROC AUC of the uncertainty for telling errors from right answers. The uncertainty is
``1 - |2p - 1|`` of the evaluated P(tumour); with TTA also the spread of the views (the standard
deviation of P(tumour) over the 8 views), with MC-dropout that of the samples.

Outputs (``out``, default ``PACKAGE/eval_<split>/``): ``eval.json`` (accuracy, ROC AUC,
confusion matrix, counts, leaky flag, ``calibration``, ``selective``), ``roc.png``,
``reliability.png`` (reliability diagram, before and after the temperature when the package has
one) and ``risk_coverage.png``.
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

from wsi_toolkit import plots, reliability
from wsi_toolkit.atomic import write_json_atomic
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.inference import probabilities, resolve_device, split_for_mc_dropout
from wsi_toolkit.limits import check_int
from wsi_toolkit.model_package import ModelConfig, load_model_package, set_calibration

__all__ = [
    "LEAKY_NOTE",
    "binary_metrics",
    "dihedral_views",
    "EvalResult",
    "evaluate_package",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_risk_coverage",
    "plot_roc",
    "uncertainty_report",
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


def uncertainty_report(view_probs: np.ndarray, labels: np.ndarray, *, tumor_index: int = 1,
                       uncalibrated_view_probs: np.ndarray | None = None, temperature: float = 1.0,
                       n_bins: int = reliability.ECE_BINS, spread: str = "tta",
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(calibration, selective)`` sections of ``eval.json`` from per-view class probabilities.

    ``view_probs``: float ``(N, V, C)``, the package's probabilities of each of ``V`` views (``V = 1``
    without TTA; the prediction is their mean over views); ``uncalibrated_view_probs`` the same at
    temperature 1 when the package has another (for the "before" ECE). The uncertainty
    ``"margin"`` is ``1 - |2p - 1|`` of the mean P(tumour); with ``V > 1`` also ``"<spread>_spread"``
    (``spread``: ``"tta"``, the views, or ``"mc_dropout"``, ``V`` MC-dropout samples of each patch), the
    standard deviation of P(tumour) over the ``V``.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    vp = np.asarray(view_probs, np.float64)
    probs = vp.mean(1)
    p = probs[:, tumor_index]
    is_tumor = labels == tumor_index
    binning = (f"{n_bins} equal-width bins of P(tumour) over [0, 1] (bin k: k/{n_bins} < p <= (k+1)/{n_bins}); "
               "top_label: the same bins of max(p, 1 - p) against accuracy")
    calibration: dict[str, Any] = {
        "temperature": float(temperature),
        "ece": _finite(reliability.expected_calibration_error(p, is_tumor, n_bins=n_bins)),
        "ece_top_label": _finite(reliability.expected_calibration_error(p, is_tumor, n_bins=n_bins,
                                                                        confidence="top_label")),
        "nll": _nll(probs, labels),
        "ece_bins": n_bins,
        "binning": binning,
    }
    if uncalibrated_view_probs is not None:
        raw = np.asarray(uncalibrated_view_probs, np.float64).mean(1)
        calibration.update({
            "ece_uncalibrated": _finite(reliability.expected_calibration_error(raw[:, tumor_index], is_tumor,
                                                                               n_bins=n_bins)),
            "ece_top_label_uncalibrated": _finite(reliability.expected_calibration_error(
                raw[:, tumor_index], is_tumor, n_bins=n_bins, confidence="top_label")),
            "nll_uncalibrated": _nll(raw, labels),
        })
    correct = probs.argmax(1) == labels
    selective: dict[str, Any] = {
        "margin": {"uncertainty": "1 - |2p - 1| of P(tumour)" + (
            (" (the TTA mean)" if spread == "tta" else " (the MC-dropout mean)") if vp.shape[1] > 1 else ""),
                   **reliability.selective_report(correct, reliability.binary_uncertainty(np.clip(p, 0, 1)))},
    }
    if vp.shape[1] > 1:
        over = "views" if spread == "tta" else "MC-dropout samples"
        selective[f"{spread}_spread"] = {
            "uncertainty": f"standard deviation of P(tumour) over the {vp.shape[1]} {over}",
            **reliability.selective_report(correct, vp[:, :, tumor_index].std(1))}
    return calibration, selective


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _nll(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean -ln P(true class) (probabilities clipped at 1e-12)."""
    if not len(labels):
        return None
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


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


def plot_reliability(p_tumor: dict[str, np.ndarray], is_tumor: np.ndarray, path: str | os.PathLike, *,
                     n_bins: int = reliability.ECE_BINS, title: str = "") -> Path:
    """Reliability diagram: per bin of P(tumour) (``n_bins`` equal-width over [0, 1]), the fraction
    of tumour patches against the mean P(tumour), one curve per entry of ``p_tumor`` (e.g.
    ``{"T = 1": ..., "T = 1.8": ...}``), with its ECE in the legend and the bins' counts below."""
    t = np.asarray(is_tumor, bool)
    fig = plots.new_figure((4.8, 5.4), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    width = 1.0 / n_bins
    for i, (name, p) in enumerate(p_tumor.items()):
        bins = reliability.reliability_bins(p, t, n_bins=n_bins)
        used = bins["count"] > 0
        ece = reliability.expected_calibration_error(p, t, n_bins=n_bins)
        ax.plot(bins["mean_p"][used], bins["frac_true"][used], "o-", ms=3, lw=1.3, label=f"{name}: ECE {ece:.4f}")
        centres = bins["edges"][:-1] + width / 2
        k = len(p_tumor)
        ax_n.bar(centres - width / 2 + (i + 0.5) * width / k, bins["count"], width=width / k, alpha=0.7, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of tumour patches")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "reliability", fontsize=9)
    ax_n.set_yscale("log")
    ax_n.set_xlabel(f"P(tumour), {n_bins} equal-width bins")
    ax_n.set_ylabel("patches")
    return plots.save_figure(fig, path)


def plot_risk_coverage(correct: np.ndarray, uncertainties: dict[str, np.ndarray], path: str | os.PathLike, *,
                       title: str = "") -> Path:
    """Accuracy of the patches kept against the share kept, most certain first, one curve per
    uncertainty (with its error-detection AUROC in the legend); marks at 95, 90 and 80 % kept."""
    fig = plots.new_figure((4.8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    c = np.asarray(correct, bool)
    for name, u in uncertainties.items():
        cov, acc = reliability.risk_coverage(c, u)
        auc = reliability.error_detection_auroc(c, u)
        ax.plot(cov, acc, lw=1.3, label=f"{name}: error AUROC {'n/a' if auc is None else f'{auc:.3f}'}")
    for f in reliability.REFERRAL_FRACTIONS:
        ax.axvline(1 - f, color="grey", lw=0.7, ls=":")
    if len(c):
        ax.axhline(float(c.mean()), color="grey", lw=0.7, ls="--", label=f"all kept: {c.mean():.4f}")
    ax.set_xlim(0, 1.01)
    ax.set_xlabel("coverage (share of patches kept, most certain first)")
    ax.set_ylabel("accuracy of the patches kept")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "risk-coverage", fontsize=9)
    return plots.save_figure(fig, path)


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
    calibration: dict = field(default_factory=dict)
    selective: dict = field(default_factory=dict)
    mc_dropout: dict | None = None  # samples, seed, the head's dropout p; None without MC-dropout

    def to_dict(self) -> dict:
        return {
            "package": str(self.package), "data": str(self.data), "split": self.split, "tta": self.tta,
            "tta_views": 8 if self.tta else 1, "mc_dropout": self.mc_dropout, "leaky": self.leaky,
            "leaky_note": LEAKY_NOTE if self.leaky else None,
            **self.metrics, "calibration": self.calibration, "selective": self.selective,
            "seconds": round(self.seconds, 3), "runtime": self.runtime,
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
    fit_temperature: bool = False,
    mc_dropout: int = 0,
    mc_dropout_seed: int = 0,
) -> EvalResult:
    """Evaluate the model package at ``package`` on ``split`` of the patch set at ``data``.

    Writes ``eval.json`` and ``roc.png`` into ``out`` (default ``PACKAGE/eval_<split>/``).
    For a Kaggle folder the random
    valid split is rebuilt with ``valid_fraction``/``seed`` (default: those the package was
    trained with, from its config) and its numbers are labelled leaky.
    ``runtime``/``precision``: see the module docstring (torch runs fp32 here: ``auto`` or ``fp32``).
    ``ov_preprocess``: OpenVINO with the preprocessing in its graph (``graph``) or in torch (``torch``).
    ``calibration`` is INT8's calibration patches; ``fit_temperature`` fits the package's temperature
    on this split and writes it into its ``config.json`` before the metrics are computed (module docstring).
    ``mc_dropout``: samples of Monte-Carlo dropout per patch (0: off), ``mc_dropout_seed`` their seed
    (module docstring).
    """
    from wsi_toolkit.runtime import calibration_from_dataset, calibration_from_pcam, select_runtime

    t0 = time.perf_counter()
    batch_size = check_int(batch_size, "batch_size")
    if mc_dropout:
        if tta or fit_temperature:
            raise ConfigError("--mc-dropout is an uncertainty method of its own: drop --tta and --fit-temperature "
                              "(fit the temperature in a run without --mc-dropout)")
        if runtime == "openvino" or precision not in ("auto", "fp32"):
            raise ConfigError("MC-dropout runs on the torch runtime: use --runtime torch (fp32)")
        runtime = "torch"
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
    predict_logits = choice.model.predict_logits if choice.model is not None else pkg.predict_logits
    mc = None
    if mc_dropout:
        mc = split_for_mc_dropout(pkg.load_torchscript().eval(), samples=mc_dropout, seed=mc_dropout_seed,
                                  input_size=cfg.input_size, source=pkg.path)

        def predict_samples(patches: torch.Tensor, index: torch.Tensor) -> np.ndarray:
            """(B, K, C) logits of the K MC-dropout samples of each patch."""
            with torch.inference_mode():
                out = mc(pkg.preprocess(patches.to(dev)), index).float().cpu()
            return out.reshape(mc_dropout, len(index), -1).transpose(0, 1).numpy()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=int(workers),
                                         collate_fn=_collate)
    logits, labels = [], []
    done = 0
    how = ' +TTA' if tta else f' +MC-dropout({mc_dropout})' if mc_dropout else ''
    with tqdm(total=len(ds), desc=f"pcam-eval {split}{how}", unit="patch",
              disable=not progress or None, leave=False) as bar:
        for x, y in loader:
            if mc is not None:  # (B, K, C): the K samples of each patch, indexed by its place in the split
                logits.append(predict_samples(x, torch.arange(done, done + len(y))).astype(np.float32))
            else:
                views = dihedral_views(x) if tta else [x]
                # (B, V, C): the logits of every view; view 0 is the patch as it is
                logits.append(np.stack([np.asarray(predict_logits(v), np.float32) for v in views], axis=1))
            labels.append(y.numpy())
            done += len(y)
            bar.update(len(y))
    n_views = 8 if tta else mc_dropout or 1
    logits_a = np.concatenate(logits) if logits else np.zeros((0, n_views, cfg.num_classes), np.float32)
    labels_a = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if fit_temperature:
        note = " (LEAKY random split)" if leaky else ""
        fitted = reliability.temperature_calibration(
            logits_a[:, 0], labels_a, tumor_index=tumor,
            fitted_on=f"{split} split{note} of {Path(data).name}, n={len(labels_a)}, single view (pcam-eval)")
        cfg = set_calibration(package, fitted)
        logger.info("temperature %.4g fitted on %s (NLL %.4f -> %.4f, ECE %.4f -> %.4f), written to %s",
                    fitted["temperature"], fitted["fitted_on"], fitted["nll_before"], fitted["nll_after"],
                    fitted["ece_before"], fitted["ece_after"], Path(package) / "config.json")
    temperature = cfg.temperature

    def view_probs(t: float) -> np.ndarray:
        flat = torch.from_numpy(logits_a.reshape(-1, logits_a.shape[-1]))
        return probabilities(flat, t).numpy().reshape(logits_a.shape)

    vp = view_probs(temperature)
    raw = view_probs(1.0) if temperature != 1.0 else None
    probs_a = vp.mean(1).astype(np.float32)
    metrics = binary_metrics(probs_a, labels_a, tumor_index=tumor, class_names=cfg.class_names)
    cal, selective = uncertainty_report(vp, labels_a, tumor_index=tumor, uncalibrated_view_probs=raw,
                                        temperature=temperature, spread="mc_dropout" if mc else "tta")
    cal["package"] = cfg.to_dict()["wsi_toolkit"].get("calibration")
    result = EvalResult(package=Path(package), data=Path(data), split=split, tta=tta, leaky=leaky, metrics=metrics,
                        probs=probs_a, labels=labels_a, seconds=time.perf_counter() - t0,
                        runtime=choice.info, calibration=cal, selective=selective,
                        mc_dropout=None if mc is None else {"samples": mc_dropout, "seed": mc_dropout_seed,
                                                            "dropout_p": mc.dropout_ps})
    out_dir = Path(out) if out is not None else Path(package) / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    label = f"{split}{' (LEAKY)' if leaky else ''}{', 8-view TTA' if tta else ''}"
    label += f", MC-dropout x{mc_dropout}" if mc else ""
    acc = metrics["accuracy"]
    p_tumor = probs_a[:, tumor] if len(probs_a) else np.zeros(0)
    is_tumor = labels_a == tumor
    plot_roc(p_tumor, is_tumor, out_dir / "roc.png",
             title=f"{Path(package).name} on {label}: accuracy {acc:.4f}" if acc is not None else label)
    curves = {} if raw is None else {"T = 1 (uncalibrated)": raw.mean(1)[:, tumor]}
    curves[f"T = {temperature:.3g}" + (" (package)" if raw is not None else "")] = p_tumor
    plot_reliability(curves, is_tumor, out_dir / "reliability.png", title=f"{Path(package).name} on {label}")
    correct = probs_a.argmax(1) == labels_a if len(labels_a) else np.zeros(0, bool)
    uncertainties = {"1 - |2p - 1|": reliability.binary_uncertainty(np.clip(p_tumor, 0, 1))}
    if tta:
        uncertainties["TTA spread (std of 8 views)"] = vp[:, :, tumor].std(1)
    if mc is not None:
        uncertainties[f"MC-dropout spread (std of {mc_dropout} samples)"] = vp[:, :, tumor].std(1)
    plot_risk_coverage(correct, uncertainties, out_dir / "risk_coverage.png",
                       title=f"{Path(package).name} on {label}: referring the most uncertain")
    write_json_atomic(out_dir / "eval.json", result.to_dict())
    result.out = out_dir
    return result

