"""What a training run shows of itself: Grad-CAM, the lr_find curves, the loss curves and the
top-loss patches (PNG files, written through :mod:`wsi_toolkit.plots`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from patch_model._fastai import hook_output
from wsi_toolkit.plots import new_figure, save_figure

__all__ = ["gradcam", "plot_lr_find", "plot_losses", "plot_top_losses_gradcam"]


def gradcam(model: torch.nn.Module, x: torch.Tensor, *, layer: torch.nn.Module, class_idx: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps, float32 ``(N, h, w)`` in [0, 1] at ``layer``'s resolution.

    ``x``: the model's input batch ``(N, 3, S, S)`` (preprocessed); ``class_idx``: ``(N,)`` the
    class explained per image. ``layer``'s output is caught with fastai's ``hook_output`` (for
    fastai vision models: ``model[0]``, the body, whose output is the last conv block's) and its
    gradient taken with ``torch.autograd.grad`` (no backward hooks).
    """
    was_training = model.training
    model.eval()
    try:
        with hook_output(layer, detach=False) as h_act, torch.enable_grad():
            out = model(x.detach().requires_grad_(True))
            acts = h_act.stored
            score = out.gather(1, class_idx.view(-1, 1).to(out.device)).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        model.train(was_training)
    acts, grads = acts.detach().float(), grads.float()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts).sum(dim=1))
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu().numpy().astype(np.float32)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None, path: Path, *,
                 title: str, skip_end: int = 5) -> Path:
    """fastai's lr_find curve (loss vs learning rate, log x), the valley marked."""
    fig = new_figure((6, 4), layout="constrained")
    ax = fig.add_subplot()
    n = max(len(lrs) - skip_end, 1) if len(lrs) > skip_end + 1 else len(lrs)
    ax.plot(list(lrs)[:n], list(losses)[:n])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", ls="--", label=f"valley {suggestion:.2e}")
        ax.legend()
    ax.set_title(title)
    return save_figure(fig, path)


def plot_losses(batches: Sequence[tuple[str, float]], epochs: Sequence[dict], path: Path) -> Path:
    """Smoothed train loss per batch and valid loss per epoch, over both fits."""
    fig = new_figure((7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(batches) + 1), [b[1] for b in batches], label="train (smoothed)", color="tab:blue")
    ends = np.cumsum([e.get("n_batches", 0) for e in epochs])
    vl = [e.get("valid_loss") for e in epochs]
    ax.plot(ends, [np.nan if v is None else v for v in vl], "o-", label="valid", color="tab:orange")
    n_frozen = sum(e.get("n_batches", 0) for e in epochs if e["phase"] == "frozen")
    if 0 < n_frozen < len(batches):
        ax.axvline(n_frozen + 0.5, color="grey", ls=":", label="unfreeze")
    ax.set_xlabel("batch")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.set_title("train / valid loss")
    return save_figure(fig, path)


def plot_top_losses_gradcam(patches: np.ndarray, cams: np.ndarray, rows: Sequence[dict], path: Path, *,
                            title: str) -> Path:
    """Patches (uint8 ``(k, 96, 96, 3)``) with their Grad-CAM overlaid and the centre 32x32
    label region outlined; ``rows``: true/pred/loss/prob per patch."""
    from matplotlib.patches import Rectangle

    k = len(patches)
    ncol = min(k, 3) if k else 1
    nrow = max(1, math.ceil(k / ncol))
    fig = new_figure((3.2 * ncol, 3.4 * nrow), layout="constrained")
    fig.suptitle(title)
    for i in range(max(k, 1)):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.set_axis_off()
        if not k:
            ax.text(0.5, 0.5, "no patches", ha="center", va="center")
            continue
        p = patches[i]
        h, w = p.shape[:2]
        cam = torch.from_numpy(cams[i])[None, None]
        cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        ax.imshow(p)
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.add_patch(Rectangle((w / 3 - 0.5, h / 3 - 0.5), w / 3, h / 3, fill=False, ec="white", lw=1, ls="--"))
        r = rows[i]
        ax.set_title(f"true {r['true']} / pred {r['pred']}\nloss {r['loss']:.2f}, P(tumor) {r['p_tumor']:.2f}",
                     fontsize=8)
    return save_figure(fig, path)
