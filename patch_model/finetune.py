"""Fine-tuning from a model package: its weights as the start, old patches replayed, a lineage recorded.

``pcam-train --init-from PACKAGE --data NEW [--replay OLD --replay-fraction F]``:

- :func:`read_parent`: the parent package (``config.json`` + ``torchscript_model.pt``, sha256 checked)
  and its whole model's ``state_dict`` (body AND head), read from the TorchScript: a package holds
  no fastai checkpoint, but TorchScript keeps the module names of the fastai model it was traced
  from, so the state_dict fits a freshly built learner of the same architecture and input size;
- :func:`init_from_parent`: loads it into the learner's model, every key and shape checked (an error
  naming the package and what differs otherwise);
- :class:`ReplayMix` / :func:`replay_count`: the new training patches plus a seeded share of the old
  data set's training patches (against forgetting what the parent knew);
- :func:`lineage`: what the child's ``config.json`` records (``wsi_toolkit.lineage``): the parent's
  sha256, name and path, and each data set it saw with its patch count and role (``new``/``replay``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_toolkit.errors import ConfigError

__all__ = ["ParentPackage", "read_parent", "check_parent", "init_from_parent", "ReplayMix", "replay_count",
           "lineage"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParentPackage:
    """A package fine-tuning starts from: where it is, its identity (sha256 of ``torchscript_model.pt``),
    what it is (architecture, input px, class names), its training recipe and its weights."""

    path: Path
    sha256: str
    architecture: str
    input_size: int
    class_names: tuple[str, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    training_data: str | None = None
    state_dict: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The package folder's name, with its parent folder when it is pcam-train's ``model``."""
        p = self.path.resolve()
        return f"{p.parent.name}/{p.name}" if p.name == "model" else p.name


def read_parent(path: str | Path) -> ParentPackage:
    """Load the package at ``path`` (TorchScript, sha256 verified) as a :class:`ParentPackage`."""
    from wsi_toolkit.model_package import load_model_package

    pkg = load_model_package(path, prefer_export=False)
    training = pkg.config.extra.get("training") or {}
    state = {k: v.detach().to("cpu").clone() for k, v in pkg.model.state_dict().items()}
    return ParentPackage(path=Path(path), sha256=pkg.sha256, architecture=pkg.config.architecture,
                         input_size=pkg.config.input_size, class_names=tuple(pkg.config.class_names),
                         recipe=dict(training.get("recipe") or {}), training_data=training.get("data"),
                         state_dict=state)


def check_parent(parent: ParentPackage, *, arch: str, size: int, class_names: Sequence[str]) -> None:
    """The child is built as its parent was: same architecture, input px and classes (ConfigError naming
    the package and the options that would fit otherwise)."""
    if parent.architecture != arch or parent.input_size != size:
        raise ConfigError(f"--init-from {parent.path}: that package is {parent.architecture} at {parent.input_size} "
                          f"px, this run builds {arch} at {size} px; fine-tuning keeps the architecture: pass "
                          f"--arch {parent.architecture} --size {parent.input_size} (or leave both out)")
    if tuple(parent.class_names) != tuple(class_names):
        raise ConfigError(f"--init-from {parent.path}: its classes {list(parent.class_names)} are not this run's "
                          f"{list(class_names)}; fine-tuning keeps the head, so the classes must be the same")


def init_from_parent(model: torch.nn.Module, parent: ParentPackage) -> int:
    """Copy the parent's weights (body and head, BatchNorm statistics included) into ``model``; every
    key and shape must match. Returns the number of tensors loaded."""
    target = model.state_dict()
    missing = [k for k in target if k not in parent.state_dict]
    unexpected = [k for k in parent.state_dict if k not in target]
    shapes = [f"{k}: {tuple(parent.state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in parent.state_dict and tuple(parent.state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"--init-from {parent.path}: its weights do not fit this {parent.architecture} model: {len(missing)} "
            f"tensors missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shapes)} of another shape (e.g. {shapes[:2]}); fine-tune a package pcam-train wrote for this "
            "architecture")
    model.load_state_dict({k: parent.state_dict[k] for k in target}, strict=True)
    logger.info("initialised from %s (sha256 %s): %d tensors, body and head", parent.path, parent.sha256[:12],
                len(target))
    return len(target)


def replay_count(n_new: int, fraction: float, n_old: int) -> int:
    """Old patches to mix into ``n_new`` new ones so that they are ``fraction`` of the mix
    (``round(n_new * fraction / (1 - fraction))``), at most ``n_old``.

    >>> replay_count(300, 0.25, 10_000), replay_count(300, 0.5, 100), replay_count(300, 0.0, 100)
    (100, 100, 0)
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"replay_fraction must be in [0, 1); got {fraction!r}")
    want = round(n_new * fraction / (1 - fraction))
    if want > n_old:
        logger.warning("replay: %d old patches wanted for a %.0f%% share, the old train split has %d; all replayed",
                       want, 100 * fraction, n_old)
    return min(want, n_old)


class ReplayMix(torch.utils.data.Dataset):
    """The new training split followed by ``n_replay`` patches of the old one, drawn without replacement
    (``seed``), in the old set's order. Items ``(patch uint8 (96, 96, 3), label)``; ``labels`` int64;
    ``leaky`` when either part is."""

    def __init__(self, new: Any, old: Any, n_replay: int, *, seed: int, old_name: str = "old"):
        from patch_model.loaders import labels_of

        self.new, self.old = new, old
        self.old_index = np.sort(np.random.default_rng(seed).choice(len(old), n_replay, replace=False))
        old_labels = labels_of(old)[self.old_index]
        self.labels = np.concatenate([labels_of(new), old_labels]).astype(np.int64)
        self.leaky = bool(getattr(new, "leaky", False) or getattr(old, "leaky", False))
        self.n_new, self.n_replay = len(new), int(n_replay)
        self.description = (f"{len(new)} new patches + {n_replay} replayed ({int(old_labels.sum())} tumour) from "
                            f"{old_name}: {getattr(new, 'description', '')}")

    def __len__(self) -> int:
        return self.n_new + self.n_replay

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0 or i >= len(self):
            raise IndexError(i)
        if i < self.n_new:
            return self.new[i]
        return self.old[int(self.old_index[i - self.n_new])]


def lineage(parent: ParentPackage | None, data: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``wsi_toolkit.lineage`` of a package: ``{"parent": {"sha256", "name", "path", "architecture"} or
    None, "data": [{"path", "n_patches", "role", ...}, ...]}``."""
    return {
        "parent": None if parent is None else {"sha256": parent.sha256, "name": parent.name,
                                               "path": str(parent.path.resolve()),
                                               "architecture": parent.architecture},
        "data": [dict(d) for d in data],
    }
