"""fastai callbacks of a training run: keep the best epoch across both fits, record the history."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from patch_model._fastai import Callback, Recorder, SaveModelCallback, TrackerCallback

__all__ = ["KeepBest", "History", "finite_or_none"]

logger = logging.getLogger(__name__)


def finite_or_none(v: Any) -> float | None:
    """``float(v)`` when that is a finite number, else None (JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class KeepBest(SaveModelCallback):
    """SaveModelCallback across both fits (``reset_on_fit=False``): the best epoch of the whole
    run is saved and loaded at the end; reports through logging, remembers which epoch won
    (``best_at`` = ``(phase, epoch)``).

    A tie on the monitored metric (ROC AUC saturates at 1.0 on easy data) goes to the epoch
    with the lower validation loss, i.e. the better calibrated one.
    """

    def __init__(self, monitor: str):
        super().__init__(monitor=monitor, fname="best", reset_on_fit=False)
        self.phase, self.best_at, self.best_loss = "", None, math.inf

    def after_epoch(self):
        TrackerCallback.after_epoch(self)
        names = list(self.recorder.metric_names[1:])
        loss = float(self.recorder.values[-1][names.index("valid_loss")])
        val = float(self.recorder.values[-1][self.idx])
        if not self.new_best and self.monitor != "valid_loss" and val == float(self.best) and loss < self.best_loss:
            self.new_best = True
        if self.new_best:
            self.best_loss = loss
            logger.info("better model at %s epoch %d: %s = %.5f (valid_loss %.5f)", self.phase, self.epoch + 1,
                        self.monitor, self.best, loss)
            self.best_at = (self.phase, self.epoch + 1)
            self._save(self.fname)


class History(Callback):
    """Per-epoch metrics (``epochs``: one dict per epoch) and the per-batch smoothed train loss
    (``batches``: ``(phase, loss)``) of the fits it is attached to; logs each epoch."""

    order = Recorder.order + 1

    def __init__(self):
        self.phase, self.epochs, self.batches = "", [], []
        self._t0, self._n0 = 0.0, 0

    def before_epoch(self):
        self._t0 = time.perf_counter()
        self._n0 = len(self.batches)

    def after_batch(self):
        if self.training:
            self.batches.append((self.phase, float(self.smooth_loss)))

    def after_epoch(self):
        names = list(self.recorder.metric_names[1:-1])
        vals = self.recorder.log[1:len(names) + 1]
        row = {"phase": self.phase, "epoch": self.epoch + 1, "global_epoch": len(self.epochs) + 1}
        for n, v in zip(names, vals):
            row["roc_auc" if n == "roc_auc_score" else n] = finite_or_none(v)
        row["seconds"] = round(time.perf_counter() - self._t0, 3)
        row["n_batches"] = len(self.batches) - self._n0
        self.epochs.append(row)
        logger.info("%s epoch %d/%d: %s", self.phase, self.epoch + 1, self.n_epoch,
                    ", ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                              if k not in ("phase", "epoch", "global_epoch")))
