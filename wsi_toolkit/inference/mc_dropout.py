"""Monte-Carlo dropout: the backbone run once, the classifier head K times with its dropout sampled.

A fastai ``vision_learner`` model is ``Sequential(body, head)``; its head is
``Sequential(AdaptiveConcatPool2d, Flatten, BatchNorm1d, Dropout(0.25), Linear, ReLU, BatchNorm1d,
Dropout(0.5), Linear)``. The package stores it traced in eval mode, so each TorchScript ``Dropout``
submodule's graph holds ``aten::dropout(x, p, train=False)`` as a constant: putting the module in
training mode would not switch it on. :func:`split_for_mc_dropout` therefore reads the head's steps
and each dropout's ``p`` (the eager module's ``p``, or the constant in its TorchScript graph) and
:class:`McDropoutModel` runs them itself: every step as the package has it (BatchNorm with its
running statistics, i.e. eval mode), and at each ``Dropout`` a sampled mask instead of the identity.

Masks: element-wise Bernoulli(1 - p) keep-masks, kept values scaled by ``1 / (1 - p)`` (what
``torch.nn.Dropout`` does in training). They are drawn per patch on the CPU from numpy's PCG64
generator seeded with ``SeedSequence([seed, patch index])`` (float32 uniforms, ``(K, d)`` per
dropout layer in order; kept where ``>= p``), so a patch's K samples depend only on the seed and its
index, not on the batch it was in, the batch size, the reader threads or the device. (Not torch's
CPU generator: its Mersenne Twister keeps only 32 bits of a seed, so seeds and indices would
collide.) The K samples
come out sample-major, ``(K * N, C)`` logits, the layout :func:`~.tta.combine_views` averages: the
mean probability over the samples and their population standard deviation (the uncertainty map).

Cost: the body runs once per patch, the head K times (on a fastai head a few matrix products of
width 512-2560, small beside an EfficientNet or ResNet body), so K = 32 samples cost little more
than one plain forward pass (BENCHMARKS.md, "MC-dropout").

The steps before the first dropout (pooling, flatten, the first BatchNorm) run once; the head is
"run K times" from the first dropout on. A package whose model is not ``Sequential(body, head)``
with a ``Sequential`` head holding at least one ``Dropout`` (a WSInfer zoo model, a model exported
without the fastai head, a ``model.pt2`` graph: exported in eval mode, its dropouts are gone) is
refused with a :class:`~wsi_toolkit.errors.ModelPackageError` naming the package. Element-wise
``Dropout`` only: other dropout kinds (``Dropout2d``, ``AlphaDropout``) run as the package has them
(identity in eval mode).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_toolkit.errors import ModelPackageError
from wsi_toolkit.limits import check_int

__all__ = ["McDropoutModel", "split_for_mc_dropout", "head_dropout_ps", "MC_DROPOUT_MIN_SAMPLES"]

log = logging.getLogger(__name__)

#: The fewest samples an MC-dropout run takes (one sample has no spread).
MC_DROPOUT_MIN_SAMPLES = 2

_FIX = ("export the model as a fastai vision_learner (Sequential(body, head) with the head's Dropout layers, "
        "patch_model.export_learner), or use --tta for an uncertainty map")


def _kind(module: Any) -> str:
    """The class name a module was written as (a TorchScript module keeps it as ``original_name``)."""
    return str(getattr(module, "original_name", None) or type(module).__name__)


def _children(module: Any) -> list[Any]:
    return [m for _, m in module.named_children()]


def _dropout_p(module: Any) -> float | None:
    """``p`` of an element-wise dropout module (eager or TorchScript); None when it is not one."""
    if _kind(module) != "Dropout":
        return None
    p = getattr(module, "p", None)  # eager, or a scripted module that kept the attribute
    if isinstance(p, (int, float)):
        return float(p)
    graph = getattr(module, "graph", None)  # traced: p is a constant input of aten::dropout
    for node in (graph.nodes() if graph is not None else ()):
        if node.kind() in ("aten::dropout", "aten::dropout_"):
            value = node.inputsAt(1).toIValue()
            if isinstance(value, (int, float)):
                return float(value)
    return None


@dataclass(frozen=True)
class _Step:
    module: Any  # the package's module for this step, run as it is; None for a sampled dropout
    p: float = 0.0


def _split(model: Any, source: Path | str | None) -> tuple[Any, list[_Step]]:
    if isinstance(model, torch.nn.Module) and _kind(model) == "ExportedModel":
        raise ModelPackageError("its model was loaded from model.pt2, an inference graph exported in eval mode "
                                "whose dropouts are gone; MC-dropout needs the TorchScript "
                                "(ModelPackage.load_torchscript())", source=source)
    children = _children(model) if _kind(model) == "Sequential" else []
    head = children[-1] if len(children) == 2 else None
    if head is None or _kind(head) != "Sequential":
        got = _kind(model) + (f" of {len(children)} parts" if children else "")
        raise ModelPackageError(f"MC-dropout needs a model Sequential(body, head) with a Sequential head, as fastai's "
                                f"vision_learner makes; this model is a {got}: {_FIX}", source=source)
    steps = []
    for m in _children(head):
        p = _dropout_p(m)
        if _kind(m) == "Dropout" and p is None:
            raise ModelPackageError(f"cannot read the dropout probability of its head's {_kind(m)} layer: {_FIX}",
                                    source=source)
        steps.append(_Step(None, p) if p is not None else _Step(m))
    if not any(s.module is None for s in steps):
        names = ", ".join(_kind(m) for m in _children(head)) or "nothing"
        raise ModelPackageError(f"MC-dropout needs a Dropout layer in the model's head; its head is {names}: {_FIX}",
                                source=source)
    return children[0], steps


def head_dropout_ps(model: Any, *, source: Path | str | None = None) -> list[float]:
    """The ``p`` of each ``Dropout`` in ``model``'s head, in order (e.g. ``[0.25, 0.5]`` for fastai's);
    :class:`ModelPackageError` when the model has no body/head split or no head dropout."""
    return [s.p for s in _split(model, source)[1] if s.module is None]


class McDropoutModel:
    """``model`` split for MC-dropout (:func:`split_for_mc_dropout`): call it with a normalised
    float batch ``x`` ``(N, 3, S, S)`` and the patches' indices ``index`` (int ``(N,)``, any order)
    for ``(samples * N, C)`` logits, sample-major (rows ``k * N .. (k + 1) * N`` are sample ``k``).

    ``body`` may be replaced (e.g. by an optimised CPU graph of the same module) before use:
    it is called as ``body(x)``. ``samples`` >= 2; ``seed`` a non-negative int. Masks: module docstring.
    """

    def __init__(self, body: Any, steps: Sequence[_Step], *, samples: int, seed: int):
        self.body = body
        self.steps = list(steps)
        self.samples = int(samples)
        self.seed = int(seed)

    @property
    def dropout_ps(self) -> list[float]:
        return [s.p for s in self.steps if s.module is None]

    def mask_generators(self, index: torch.Tensor) -> list[np.random.Generator]:
        """One generator per patch, seeded with ``SeedSequence([seed, index])``."""
        return [np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(i)])))
                for i in index.tolist()]

    def _mask(self, gens: list[np.random.Generator], shape: tuple[int, ...], p: float,
              like: torch.Tensor) -> torch.Tensor:
        """Scaled keep-masks ``(samples, N, *shape)`` in ``like``'s dtype and device."""
        draws = np.empty((len(gens), self.samples, *shape), np.float32)  # patch-major: each patch's draws contiguous
        for row, g in zip(draws, gens):
            g.random(out=row, dtype=np.float32)
        if p >= 1.0:
            return like.new_zeros((self.samples, len(gens), *shape))
        keep = torch.from_numpy(draws >= p).to(like.dtype).mul_(1.0 / (1.0 - p))
        return keep.transpose(0, 1).to(like.device)

    def head(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The head on body features ``(N, ...)``: ``(samples * N, C)`` logits, sample-major."""
        gens = self.mask_generators(index)
        n = features.shape[0]
        x, expanded = features, False
        for step in self.steps:
            if step.module is not None:
                x = step.module(x)
                continue
            per_patch = tuple(x.shape[1:])
            if not expanded:
                x = x.unsqueeze(0).expand(self.samples, *x.shape)
                expanded = True
            else:
                x = x.reshape(self.samples, n, *per_patch)
            x = (x * self._mask(gens, per_patch, step.p, x)).reshape(self.samples * n, *per_patch)
        return x

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if len(index) != x.shape[0]:
            raise ValueError(f"index has {len(index)} entries for a batch of {x.shape[0]}")
        return self.head(self.body(x), index)

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """The head with every dropout as the identity (eval mode): the package's own logits."""
        y = self.body(x)
        for step in self.steps:
            if step.module is not None:
                y = step.module(y)
        return y


def split_for_mc_dropout(model: Any, *, samples: int, seed: int = 0, input_size: int | None = None,
                         source: Path | str | None = None) -> McDropoutModel:
    """``model`` (a loaded package's torch model: eager or TorchScript, in eval mode) as an
    :class:`McDropoutModel` with ``samples`` dropout samples per patch.

    With ``input_size`` the split is checked: body then head without dropout must give the model's
    own logits on a random ``(2, 3, input_size, input_size)`` batch (within 1e-4), else a
    :class:`ModelPackageError` (a head whose forward is not its steps in order). ``source`` (the
    package) names where errors come from.
    """
    check_int(samples, "MC-dropout samples", minimum=MC_DROPOUT_MIN_SAMPLES)
    check_int(seed, "MC-dropout seed", minimum=0)
    body, steps = _split(model, source)
    mc = McDropoutModel(body, steps, samples=samples, seed=seed)
    if input_size is not None:
        device = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
        x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.inference_mode():
            want, got = model(x), mc.deterministic(x)
        if not (isinstance(want, torch.Tensor) and want.shape == got.shape
                and torch.allclose(want.float(), got.float(), rtol=1e-4, atol=1e-4)):
            raise ModelPackageError(f"its model is Sequential(body, head) but body then head's layers in order do not "
                                    f"give its logits, so its head cannot be sampled: {_FIX}", source=source)
    log.info("MC-dropout: %d samples of the head's dropouts p = %s, seed %d", samples,
             ", ".join(f"{p:g}" for p in mc.dropout_ps), seed)
    return mc
