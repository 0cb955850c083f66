"""The article's recipe: a PCam patch classifier trained with fastai, exported as a model package.

The recipe (every step a fastai abstraction, no hand-written loop)::

    dls   = DataLoaders of uint8 patches; on the device: IntToFloatTensor, the 8 dihedral
            symmetries (train only), Resize 96 -> size (the SAME op as inference), Normalize
    learn = vision_learner(dls, resnet50, pretrained=True)        # ImageNet body, new head
    learn.freeze();   lr = learn.lr_find().valley                 # plot: lr_find_frozen.png
    learn.fit_one_cycle(epochs_frozen, lr)
    learn.unfreeze(); lr_max = learn.lr_find().valley             # plot: lr_find_unfrozen.png
    learn.fit_one_cycle(epochs, slice(lr_max / 10, lr_max))       # discriminative rates
    # best epoch (ROC AUC on valid) kept by SaveModelCallback; mixed precision on CUDA

then :func:`patch_model.export.export_learner` writes the model package ``wsi-infer`` loads.

Preprocessing invariant: for the same uint8 patches, the validation DataLoader's input tensors
equal :class:`wsi_toolkit.model_package.Preprocess` of the exported config (checked by the tests
to 1e-5), so a model sees at inference exactly what it saw in validation.

Honest validation: PCam's valid/test splits come from other slides than train. The Kaggle
layout has no slide ids, so its validation split is random and LEAKS (patches of one slide on
both sides); such numbers are labelled leaky in every output.

Offline: ImageNet weights are never downloaded. When the file is not in torch's cache,
:class:`MissingWeightsError` names the file, the folder, the URL and the alternatives
(``--weights FILE``, ``--no-pretrained``).

Multi-GPU: under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) the fits run inside
fastai's ``learn.distrib_ctx()`` and only rank 0 writes outputs (see docs/training.md).
"""

import contextlib
import importlib
import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    # fastai decorates functions with torch.jit.script at import; that FutureWarning is not ours.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    import fastai
    from fastai.callback.core import Callback
    from fastai.callback.fp16 import MixedPrecision
    from fastai.callback.hook import hook_output
    from fastai.callback.schedule import valley  # noqa: F401 - also registers fit_one_cycle / lr_find
    from fastai.callback.tracker import SaveModelCallback, TrackerCallback
    from fastai.data.core import Datasets, DataLoaders
    from fastai.data.transforms import Categorize, IntToFloatTensor, Normalize
    from fastai.learner import Learner, Recorder
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import RocAucBinary, accuracy
    from fastai.torch_core import TensorImage, num_distrib, rank_distrib, set_seed
    from fastai.vision.augment import RandTransform  # also patches TensorImage.dihedral
    from fastai.vision.learner import create_body, model_meta, vision_learner

    try:  # fastai >= 2.8
        from fasttransform.transform import Transform
    except ImportError:  # pragma: no cover - fastai 2.7
        from fastcore.transform import Transform

from patch_model.data import detect_layout, open_splits
from patch_model.evaluate import LEAKY_NOTE, binary_metrics, plot_confusion_matrix
from patch_model.export import export_learner, learner_config
from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.inference import resolve_device
from wsi_toolkit.model_package import IMAGENET_MEAN, IMAGENET_STD

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

logger = logging.getLogger(__name__)

#: Class names, in PCam label order: index 1 ("tumor") is PCam label 1.
CLASS_NAMES: tuple[str, str] = ("notumor", "tumor")
TUMOR_INDEX = 1
PCAM_PATCH_PX = 96

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Monitor = Literal["roc_auc_score", "valid_loss", "accuracy"]
_MONITORS = ("roc_auc_score", "valid_loss", "accuracy")
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")



class MissingWeightsError(WsiToolkitError, ValueError):
    """Pretrained weights were asked for but are not on this machine (nothing is downloaded)."""


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
    (bf16 where supported, else fp16) on CUDA, fp32 elsewhere.
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
    precision: Precision = "auto"
    top_losses: int = 9
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def pos_float(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        need(isinstance(self.arch, str) and bool(self.arch.strip()), f"arch must be a model name; got {self.arch!r}")
        need(is_int(self.size) and 16 <= self.size <= 1024, f"size must be an integer in [16, 1024] px; got {self.size!r}")
        need(is_int(self.epochs_frozen) and self.epochs_frozen >= 0,
             f"epochs_frozen must be an integer >= 0; got {self.epochs_frozen!r}")
        need(is_int(self.epochs) and self.epochs >= 0, f"epochs must be an integer >= 0; got {self.epochs!r}")
        need(self.epochs_frozen + self.epochs > 0, "epochs_frozen + epochs must be > 0 (nothing to train)")
        need(is_int(self.batch_size) and self.batch_size >= 2,
             f"batch_size must be an integer >= 2 (BatchNorm); got {self.batch_size!r}")
        for name in ("lr", "lr_unfrozen"):
            v = getattr(self, name)
            need(v is None or pos_float(v), f"{name} must be a positive number or None (lr_find); got {v!r}")
        need(isinstance(self.wd, (int, float)) and math.isfinite(self.wd) and self.wd >= 0,
             f"wd must be a number >= 0; got {self.wd!r}")
        need(is_int(self.seed), f"seed must be an integer; got {self.seed!r}")
        need(isinstance(self.valid_fraction, (int, float)) and 0 < self.valid_fraction < 1,
             f"valid_fraction must be in (0, 1); got {self.valid_fraction!r}")
        need(isinstance(self.test_fraction, (int, float)) and 0 <= self.test_fraction < 1
             and self.valid_fraction + self.test_fraction < 1,
             f"test_fraction must be in [0, 1) with valid_fraction + test_fraction < 1; got {self.test_fraction!r}")
        parse_augment(self.augment)
        need(self.monitor in _MONITORS, f"monitor must be one of {_MONITORS}; got {self.monitor!r}")
        need(self.lr_find_iters is None or (is_int(self.lr_find_iters) and (self.lr_find_iters == 0
                                                                            or self.lr_find_iters >= 6)),
             f"lr_find_iters must be None (auto), 0 (skip lr_find) or >= 6; got {self.lr_find_iters!r}")
        need(self.lr_find_iters != 0 or self.lr is not None or self.epochs_frozen == 0,
             "lr_find is off (lr_find_iters=0): pass --lr for the frozen fit")
        need(self.lr_find_iters != 0 or self.lr is not None or self.lr_unfrozen is not None,
             "lr_find is off (lr_find_iters=0): pass --lr-unfrozen (or --lr) for the unfrozen fit")
        need(self.workers is None or (is_int(self.workers) and self.workers >= 0),
             f"workers must be an integer >= 0; got {self.workers!r}")
        need(self.precision in _PRECISIONS, f"precision must be one of {_PRECISIONS}; got {self.precision!r}")
        need(is_int(self.top_losses) and self.top_losses >= 0, f"top_losses must be an integer >= 0; got {self.top_losses!r}")
        need(not (self.weights is not None and not self.pretrained),
             "--weights FILE and --no-pretrained contradict each other; pass one of them")
        if self.weights is not None:
            need(self.weights.is_file(), f"weights file {self.weights} does not exist")
        resolve_device(self.device)  # validates

    def n_workers(self) -> int:
        if self.workers is not None:
            return int(self.workers)
        return max(0, min(8, (os.cpu_count() or 1) - 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "out", "weights"):
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
# Architectures: a registry of sources (torchvision, timm)


@dataclass(frozen=True)
class ArchSpec:
    """A backbone resolved by name.

    ``builder``: the torchvision function (what fastai's ``vision_learner`` takes) or, for timm,
    the model name. ``mean``/``std``: the backbone's normalisation statistics.
    ``weights_url``/``weights_file``: where its ImageNet weights come from and the file name
    in torch's hub cache (``torch.hub.get_dir()/checkpoints``); ``hf_hub_id`` for timm weights
    kept in the Hugging Face cache.
    """

    name: str
    source: Literal["torchvision", "timm"]
    builder: Any
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_url: str | None = None
    weights_file: str | None = None
    hf_hub_id: str | None = None

    @property
    def in_fastai_meta(self) -> bool:
        """fastai knows how to cut and split this torchvision model (resnets, densenets, ...)."""
        return self.source == "torchvision" and "weights" in model_meta.get(self.builder, {})


def _torchvision_arch(name: str) -> ArchSpec | None:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    builder = torchvision.models.get_model_builder(name)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    url = None
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):  # pragma: no cover - a model without published weights
        weights = None
    if weights is not None:
        url = weights.url
        tf = weights.transforms()
        if getattr(tf, "mean", None) is not None and getattr(tf, "std", None) is not None:
            mean, std = tuple(float(m) for m in tf.mean), tuple(float(s) for s in tf.std)
    return ArchSpec(name=name, source="torchvision", builder=builder, mean=mean, std=std, weights_url=url,
                    weights_file=None if url is None else Path(urlparse(url).path).name)


def _timm_arch(name: str) -> ArchSpec | None:  # pragma: no cover - timm is not installed in CI
    try:
        import timm
    except ImportError:
        return None
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    mean = tuple(float(m) for m in getattr(cfg, "mean", IMAGENET_MEAN))
    std = tuple(float(s) for s in getattr(cfg, "std", IMAGENET_STD))
    url = getattr(cfg, "url", None) or None
    return ArchSpec(name=name, source="timm", builder=name, mean=mean, std=std, weights_url=url,
                    weights_file=None if not url else Path(urlparse(url).path).name,
                    hf_hub_id=getattr(cfg, "hf_hub_id", None) or None)


#: Where architecture names are looked up, in order ("timm:NAME" / "torchvision:NAME" pick one).
ARCH_SOURCES: Mapping[str, Callable[[str], ArchSpec | None]] = {
    "torchvision": _torchvision_arch,
    "timm": _timm_arch,
}


def resolve_arch(name: str) -> ArchSpec:
    """An architecture by name: torchvision first (``resnet50``, ``densenet121``,
    ``efficientnet_b0``, ...), then timm when installed; ``"timm:NAME"`` forces timm."""
    source, _, bare = name.rpartition(":")
    sources = [source] if source else list(ARCH_SOURCES)
    if source and source not in ARCH_SOURCES:
        raise ConfigError(f"architecture source {source!r} unknown; use one of {list(ARCH_SOURCES)} (e.g. timm:{bare})")
    for src in sources:
        spec = ARCH_SOURCES[src](bare)
        if spec is not None:
            return spec
    import torchvision

    some = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
    timm_hint = "" if _has_timm() else "; timm is not installed (pip install timm) for timm architectures"
    raise ConfigError(f"unknown architecture {name!r}; torchvision has e.g. {some}, ...{timm_hint}")


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def check_pretrained_cached(spec: ArchSpec) -> Path:
    """The local file of ``spec``'s ImageNet weights; :class:`MissingWeightsError` if absent.

    torchvision weights live in ``torch.hub.get_dir()/checkpoints/<file>`` (``$TORCH_HOME/hub``,
    default ``~/.cache/torch/hub``). Nothing is downloaded: the error says which file to fetch
    from where, and the alternatives.
    """
    alternatives = (
        f"Or pass --weights FILE (a state_dict .pth for {spec.name}, loaded with "
        f"torch.load(weights_only=True) into the body), or --no-pretrained to train from random "
        f"initialisation (expect lower accuracy)."
    )
    if spec.source == "timm":  # pragma: no cover - timm is not installed in CI
        if spec.hf_hub_id:
            try:
                from huggingface_hub import try_to_load_from_cache
            except ImportError:
                try_to_load_from_cache = None
            if try_to_load_from_cache is not None:
                for fname in ("model.safetensors", "pytorch_model.bin"):
                    hit = try_to_load_from_cache(spec.hf_hub_id, fname)
                    if isinstance(hit, str):
                        return Path(hit)
        if spec.weights_file and (_hub_checkpoints() / spec.weights_file).is_file():
            return _hub_checkpoints() / spec.weights_file
        where = (f"the Hugging Face cache (repo {spec.hf_hub_id}; on a machine with network: "
                 f"huggingface-cli download {spec.hf_hub_id}, then copy ~/.cache/huggingface here)")
        if spec.weights_file:
            where += f" or {_hub_checkpoints() / spec.weights_file} (from {spec.weights_url})"
        raise MissingWeightsError(
            f"ImageNet weights for timm model {spec.name!r} are not on this machine and nothing is "
            f"downloaded; put them in {where}. {alternatives}")
    if not spec.weights_file:
        raise MissingWeightsError(f"torchvision publishes no pretrained weights for {spec.name!r}. {alternatives}")
    folder = _hub_checkpoints()
    path = folder / spec.weights_file
    if path.is_file():
        return path
    raise MissingWeightsError(
        f"ImageNet weights for {spec.name} are not in the local torch cache and nothing is downloaded: "
        f"{spec.weights_file} is missing from {folder} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to "
        f"use another cache). On a machine with network, fetch {spec.weights_url} and copy it to "
        f"{path}. {alternatives}")


# --------------------------------------------------------------------------------------------
# Data into fastai


class _ReadPatch(Transform):
    """Item index -> ``TensorImage`` uint8 ``(3, 96, 96)`` (the patch, CHW)."""

    def __init__(self, source: torch.utils.data.Dataset):
        super().__init__()
        self.source = source

    def encodes(self, i):
        patch = np.asarray(self.source[int(i)][0])
        if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[-1] != 3:
            raise ConfigError(f"patch {int(i)} is {patch.shape} {patch.dtype}; expected (H, W, 3) uint8 RGB")
        return TensorImage(torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).contiguous())


class _ReadLabel(Transform):
    """Item index -> class name (``Categorize`` then maps it to its index in the vocab)."""

    def __init__(self, labels: np.ndarray, names: Sequence[str]):
        super().__init__()
        self.labels, self.names = labels, tuple(names)

    def encodes(self, i):
        return self.names[int(self.labels[int(i)])]


#: The symmetries of the square each augmentation draws from, as fastai ``TensorImage.dihedral``
#: indices: ``flips`` = the article's horizontal and vertical flips (identity, left-right,
#: top-bottom, both = 180-degree rotation); ``dihedral`` adds the 90-degree rotations and
#: transposes (all 8). Tissue has no up or left, so every one is a valid view of a patch.
SYMMETRIES: Mapping[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 1, 2, 4), "dihedral": tuple(range(8))}

#: ``TrainConfig.augment`` values: a geometric set from :data:`SYMMETRIES`, optionally ``+hed``.
AUGMENTS = ("none", "flips", "dihedral", "flips+hed", "dihedral+hed")


def parse_augment(augment: str) -> tuple[str, bool]:
    """``"dihedral+hed"`` -> ``("dihedral", True)``; :class:`ConfigError` for anything else than
    :data:`AUGMENTS`."""
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    geometric, _, hed = augment.partition("+")
    return geometric, hed == "hed"


class DihedralBatch(RandTransform):
    """Each training image gets one of ``symmetries`` (fastai ``TensorImage.dihedral`` indices,
    default all 8 symmetries of the square: identity, flips, 90-degree rotations and their
    combinations), drawn uniformly per image: exact pixel permutations, no resampling. Training
    batches only."""

    order, split_idx = 30, 0

    def __init__(self, symmetries: Sequence[int] = tuple(range(8))):
        super().__init__(p=1.0)
        self.symmetries = torch.as_tensor(sorted(set(int(k) for k in symmetries)))
        if not len(self.symmetries) or self.symmetries.min() < 0 or self.symmetries.max() > 7:
            raise ConfigError(f"symmetries must be dihedral indices 0..7; got {list(symmetries)}")

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        while isinstance(b, (tuple, list)):
            b = b[0]
        pick = torch.randint(0, len(self.symmetries), (b.shape[0],), device=b.device)
        self.k = self.symmetries.to(b.device)[pick]

    def encodes(self, x: TensorImage):
        out = x.clone()
        for k in range(1, 8):
            sel = (self.k == k).nonzero().flatten()
            if len(sel):
                out[sel] = x[sel].dihedral(k)
        return out


class HedJitterBatch(RandTransform):
    """H&E stain augmentation (Tellez et al. 2018, "H&E stain augmentation improves
    generalization of convolutional networks for histopathological mitosis detection"): each
    training image is taken to haematoxylin-eosin-DAB optical density (natural log, the unit of
    the paper's ``b``) with scikit-image's colour-deconvolution matrices
    (``skimage.color.hed_from_rgb`` / ``rgb_from_hed``), each stain channel becomes ``s * a + b``
    with ``a`` in ``[1 - sigma, 1 + sigma]`` and ``b`` in ``[-sigma, sigma]`` drawn per image and
    channel (sigma 0.05: the paper's "HED-light"), and the result goes back to RGB, clipped to
    [0, 1]. Mimics the stain differences between labs and scanners. Float ``(N, 3, H, W)`` in
    [0, 1] (after ``IntToFloatTensor``); training only.

    (``skimage.color.rgb2hed`` divides the optical density by ``-ln(1e-6)`` = 13.8; a shift of
    0.05 in *those* units is a 0.69 OD shift, which turns glass pink or grey: a first version
    here did that and lost 4 points of accuracy, docs/validation.md.)
    """

    order, split_idx = 25, 0

    def __init__(self, sigma: float = 0.05):
        super().__init__(p=1.0)
        from skimage.color import hed_from_rgb, rgb_from_hed

        self.sigma = float(sigma)
        self._to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float32)
        self._to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float32)

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        while isinstance(b, (tuple, list)):
            b = b[0]
        n = b.shape[0]
        self.scale = 1 + (torch.rand(n, 1, 3, device=b.device) * 2 - 1) * self.sigma
        self.shift = (torch.rand(n, 1, 3, device=b.device) * 2 - 1) * self.sigma

    def encodes(self, x: TensorImage):
        return TensorImage(hed_jitter(x, self.scale, self.shift, to_hed=self._to_hed, to_rgb=self._to_rgb))


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, to_hed: torch.Tensor,
               to_rgb: torch.Tensor) -> torch.Tensor:
    """RGB float ``(N, 3, H, W)`` in [0, 1] -> stain optical densities ``* scale + shift`` (both
    ``(N, 1, 3)``; OD = ``-ln(max(rgb, 1e-6))`` deconvolved with ``to_hed``) -> RGB, clipped to
    [0, 1]. With ``scale = 1, shift = 0`` it returns ``x`` (up to float rounding). The stains are
    ``skimage.color.rgb2hed``'s times ``-ln(1e-6)`` (before its clipping at 0)."""
    n, c, h, w = x.shape
    rgb = x.float().permute(0, 2, 3, 1).reshape(n, h * w, c).clamp_min(1e-6)
    stains = -torch.log(rgb) @ to_hed.to(x.device)
    stains = stains * scale + shift
    out = torch.exp(-(stains @ to_rgb.to(x.device))).clamp(0, 1)
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2).to(x.dtype).contiguous()


class ResizeBatch(Transform):
    """Float ``(N, 3, H, W)`` -> ``(N, 3, size, size)``, exactly like inference's
    :class:`~wsi_toolkit.model_package.Preprocess` ``Resize``: ``F.interpolate(mode="bilinear",
    antialias=True, align_corners=False)``. Train and valid alike (``split_idx=None``)."""

    order, split_idx = 40, None

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def encodes(self, x: TensorImage):
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return TensorImage(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                         antialias=True))


@dataclass
class PatchData:
    """The torch datasets of each split and the fastai DataLoaders over them.

    ``dls.train`` / ``dls.valid`` follow fastai's conventions (train shuffled, dihedral
    augmentation; valid in dataset order); :meth:`dl` gives any split (test included) with the
    validation transforms. ``items[split]`` are the fastai item indices of a split.
    """

    dls: DataLoaders
    datasets: Mapping[str, torch.utils.data.Dataset]
    items: Mapping[str, range]
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def dl(self, split: str, **kwargs):
        if split == "train" and not kwargs:
            return self.dls.train
        if split == "valid" and not kwargs:
            return self.dls.valid
        if split not in self.items:
            raise ConfigError(f"no split {split!r}; have {sorted(self.items)}")
        return self.dls.test_dl(list(self.items[split]), with_labels=True, **kwargs)

    def labels(self, split: str) -> np.ndarray:
        return _labels_of(self.datasets[split])


def _labels_of(ds) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is None:
        labels = [ds[i][1] for i in range(len(ds))]
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def build_dataloaders(
    splits: Mapping[str, torch.utils.data.Dataset],
    *,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    augment: bool | str = True,
    class_names: Sequence[str] = CLASS_NAMES,
) -> PatchData:
    """fastai ``DataLoaders`` over torch datasets of ``(uint8 (96, 96, 3) patch, int label)``.

    Items become a uint8 ``TensorImage`` (CHW) and a ``TensorCategory`` (vocab ``class_names``
    in label order: index 1 = PCam label 1 = tumour). Batch transforms run on ``device``:
    ``IntToFloatTensor`` (/255), the training augmentation ``augment`` (one of :data:`AUGMENTS`:
    :class:`HedJitterBatch` for ``+hed``, then :class:`DihedralBatch` over the ``flips`` or all
    ``dihedral`` symmetries; ``True`` = ``"dihedral"``, ``False`` = ``"none"``), :class:`ResizeBatch`
    to ``size``, ``Normalize(mean, std)``; i.e. on validation batches, the inference
    ``Preprocess`` of ``pcam_config(input_size=size, mean=mean, std=std)``.
    """
    geometric, hed = parse_augment({True: "dihedral", False: "none"}.get(augment, augment))
    if "train" not in splits or "valid" not in splits:
        raise ConfigError(f"need 'train' and 'valid' splits; got {sorted(splits)}")
    order = ["train", "valid"] + sorted(s for s in splits if s not in ("train", "valid"))
    parts = [splits[s] for s in order]
    labels = np.concatenate([_labels_of(ds) for ds in parts])
    bad = np.setdiff1d(np.unique(labels), np.arange(len(class_names)))
    if bad.size:
        raise ConfigError(f"labels must be in 0..{len(class_names) - 1} ({', '.join(class_names)}); found {bad.tolist()}")
    items, start = {}, 0
    for name, ds in zip(order, parts):
        items[name] = range(start, start + len(ds))
        start += len(ds)
    n_train = len(items["train"])
    if n_train < batch_size:
        raise ConfigError(f"the train split has {n_train} patches, fewer than one batch ({batch_size}); "
                          f"lower --batch-size")
    source = torch.utils.data.ConcatDataset(parts)
    dsets = Datasets(
        list(range(start)),
        tfms=[[_ReadPatch(source)], [_ReadLabel(labels, class_names), Categorize(vocab=list(class_names), sort=False)]],
        splits=[list(items["train"]), list(items["valid"])],
    )
    batch_tfms = [IntToFloatTensor()]
    if hed:
        batch_tfms.append(HedJitterBatch())
    if geometric != "none":
        batch_tfms.append(DihedralBatch(SYMMETRIES[geometric]))
    batch_tfms += [ResizeBatch(size), Normalize.from_stats(list(mean), list(std), cuda=False)]
    dev = torch.device(device)
    dls = dsets.dataloaders(bs=batch_size, after_batch=batch_tfms, device=dev, num_workers=int(workers),
                            pin_memory=dev.type == "cuda")
    return PatchData(dls=dls, datasets=dict(zip(order, parts)), items=items, size=int(size),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


# --------------------------------------------------------------------------------------------
# The learner


def _load_state_dict_file(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(f"--weights {path}: not a state_dict torch.load(weights_only=True) can read "
                          f"({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and set(sd) == {key} and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--weights {path}: expected a state_dict (a mapping of parameter names to tensors)")
    return dict(sd)


def _body_from_state_dict(learn: Learner, spec: ArchSpec, sd: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``sd`` (the full backbone's state_dict, classifier keys ignored) into ``learn.model[0]``."""
    if spec.source == "timm":  # pragma: no cover - timm is not installed in CI
        target = learn.model[0].model
        result = target.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys]
        if missing:
            raise ConfigError(f"{source}: {len(missing)} parameters of {spec.name} missing, e.g. {missing[:3]}")
        return
    full = spec.builder(weights=None)
    result = full.load_state_dict(sd, strict=False)
    meta = model_meta.get(spec.builder, {})
    body = create_body(full, pretrained=False, cut=meta.get("cut"))
    kept = {name for name, child in full.named_children() if any(child is c for c in body.children())}
    missing = [k for k in result.missing_keys if k.split(".")[0] in kept]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source} does not fit {spec.name}: {len(missing)} body parameters missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); pass a torchvision "
            f"{spec.name} state_dict")
    learn.model[0].load_state_dict(body.state_dict())


def build_learner(data: PatchData, spec: ArchSpec, *, pretrained: bool, weights: Path | None = None,
                  wd: float = 1e-2, path: Path | str = ".", monitor_metrics: bool = True) -> Learner:
    """``vision_learner`` for ``spec`` on ``data``: 2 outputs (logits), cross-entropy, metrics
    accuracy and ROC AUC, weight decay ``wd``. Body initialised from ImageNet (``pretrained``,
    from the local cache only: checked first), from ``weights`` (a state_dict file), or random."""
    if weights is not None:
        sd = _load_state_dict_file(Path(weights))
        init = "file"
    elif pretrained:
        check_pretrained_cached(spec)
        init = "imagenet"
    else:
        init = "random"
    fastai_pretrained = init == "imagenet" and (spec.in_fastai_meta or spec.source == "timm")
    kwargs = dict(normalize=False, n_out=len(CLASS_NAMES), loss_func=CrossEntropyLossFlat(),
                  metrics=[accuracy, RocAucBinary()] if monitor_metrics else [], wd=wd, path=Path(path),
                  model_dir="checkpoints")
    with warnings.catch_warnings():
        # torchvision models fastai has no metadata for are called with the legacy `pretrained=`.
        warnings.filterwarnings("ignore", message=r".*(parameter 'pretrained'|Arguments other than a weight enum).*",
                                category=UserWarning)
        learn = vision_learner(data.dls, spec.builder, pretrained=fastai_pretrained, **kwargs)
    if init == "imagenet" and not fastai_pretrained:
        import torchvision

        w = torchvision.models.get_model_weights(spec.name).DEFAULT
        _body_from_state_dict(learn, spec, w.get_state_dict(progress=False, check_hash=True), source=str(w))
    elif init == "file":
        _body_from_state_dict(learn, spec, sd, source=f"--weights {weights}")
    learn.body_init = init
    return learn


# --------------------------------------------------------------------------------------------
# Callbacks


class _KeepBest(SaveModelCallback):
    """SaveModelCallback across both fits (``reset_on_fit=False``): the best epoch of the whole
    run is saved and loaded at the end; reports through logging, remembers which epoch won.

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


class _History(Callback):
    """Per-epoch metrics (and per-batch smoothed train loss) of the fits it is attached to; logs
    each epoch."""

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
            row["roc_auc" if n == "roc_auc_score" else n] = _num(v)
        row["seconds"] = round(time.perf_counter() - self._t0, 3)
        row["n_batches"] = len(self.batches) - self._n0
        self.epochs.append(row)
        logger.info("%s epoch %d/%d: %s", self.phase, self.epoch + 1, self.n_epoch,
                    ", ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                              if k not in ("phase", "epoch", "global_epoch")))


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------------------------
# Grad-CAM


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


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no global backend is picked)


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None, path: Path, *,
                 title: str, skip_end: int = 5) -> Path:
    """fastai's lr_find curve (loss vs learning rate, log x), the valley marked."""
    fig = _figure((6, 4))
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
    fig.savefig(path, dpi=110)
    return path


def plot_losses(batches: Sequence[tuple[str, float]], epochs: Sequence[dict], path: Path) -> Path:
    """Smoothed train loss per batch and valid loss per epoch, over both fits."""
    fig = _figure((7, 4))
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
    fig.savefig(path, dpi=110)
    return path


def plot_top_losses_gradcam(patches: np.ndarray, cams: np.ndarray, rows: Sequence[dict], path: Path, *,
                            title: str) -> Path:
    """Patches (uint8 ``(k, 96, 96, 3)``) with their Grad-CAM overlaid and the centre 32x32
    label region outlined; ``rows``: true/pred/loss/prob per patch."""
    from matplotlib.patches import Rectangle

    k = len(patches)
    ncol = min(k, 3) if k else 1
    nrow = max(1, math.ceil(k / ncol))
    fig = _figure((3.2 * ncol, 3.4 * nrow))
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
    fig.savefig(path, dpi=110)
    return path


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
    labels = _labels_of(ds)
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
    if config.pretrained and config.weights is None:
        check_pretrained_cached(spec)  # fail before anything is read
    if world > 1 and (config.lr is None or config.lr_unfrozen is None):
        raise ConfigError("under torchrun/accelerate (WORLD_SIZE > 1) pass --lr and --lr-unfrozen: lr_find would "
                          "run differently on each rank; take them from a single-GPU run's lr_find plots")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    with _log_to(out / "train.log" if is_main else None):
        return _train(config, spec, world=world, rank=rank, t_start=t_start)


def _train(config: TrainConfig, spec: ArchSpec, *, world: int, rank: int, t_start: float) -> TrainResult:
    is_main = rank == 0
    out = config.out
    package_dir = out / "model"
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    precision = _precision(device, config.precision)
    workers = config.n_workers()
    logger.info("pcam-train: %s (%s) on %s, %s, data %s -> %s", spec.name, spec.source, device, precision,
                config.data, out)
    set_seed(config.seed, reproducible=True)

    layout = detect_layout(config.data)
    splits = open_splits(config.data, valid_fraction=config.valid_fraction, seed=config.seed,
                         test_fraction=config.test_fraction)
    leaky = bool(getattr(splits["valid"], "leaky", False))
    if leaky:
        logger.warning("validation numbers of this run are %s", LEAKY_NOTE)
    counts = {name: _split_counts(ds) for name, ds in splits.items()}
    for name, c in counts.items():
        logger.info("%s: %s", name, c["description"])
    valid_labels = _labels_of(splits["valid"])
    if len(np.unique(valid_labels)) < 2:
        raise ConfigError(f"the valid split holds only class {CLASS_NAMES[int(valid_labels[0])] if len(valid_labels) else '-'}"
                          f"; ROC AUC and the best-epoch choice need both classes")
    summary = _data_summary(config.data)
    synthetic = bool(summary.get("synthetic", False))

    data = build_dataloaders(splits, size=config.size, mean=spec.mean, std=spec.std, batch_size=config.batch_size,
                             device=device, workers=workers, augment=config.augment)
    learn = build_learner(data, spec, pretrained=config.pretrained, weights=config.weights, wd=config.wd, path=out)
    if precision != "fp32":
        learn.add_cb(MixedPrecision(amp_mode=precision))
    if world > 1:
        try:
            importlib.import_module("fastai.distributed")  # patches Learner.distrib_ctx
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"multi-GPU training needs accelerate (pip install accelerate): {e}") from None
    dist_ctx = learn.distrib_ctx if world > 1 else contextlib.nullcontext
    bar_ctx = (lambda: _quiet(learn)) if not config.progress else contextlib.nullcontext

    n_batches = len(data.dls.train)
    lr_iters = config.lr_find_iters if config.lr_find_iters is not None else min(100, max(50, 2 * n_batches))
    if world > 1:
        lr_iters = 0  # lr_find is not run under DDP: the rates come from --lr / --lr-unfrozen
    keep_best, history = _KeepBest(config.monitor), _History()
    lr_info: dict[str, Any] = {}
    plots: dict[str, str] = {}
    t_fit = time.perf_counter()
    with bar_ctx(), dist_ctx():
        if config.epochs_frozen > 0:
            learn.freeze()
            lr = config.lr
            if lr_iters:
                found, lrs, losses = _lr_find(learn, lr_iters)
                logger.info("lr_find (frozen): valley %.3g%s", found, "" if lr is None else f" (using --lr {lr:g})")
                if is_main:
                    plots["lr_find_frozen"] = plot_lr_find(lrs, losses, found, out / "lr_find_frozen.png",
                                                           title=f"lr_find, body frozen ({spec.name}, {config.size} px)").name
                lr_info["frozen_lr_find"] = found
                if lr is None:
                    lr = found
            lr_info["frozen"] = float(lr)
            lr_info["frozen_source"] = "--lr" if config.lr is not None else "lr_find valley"
            keep_best.phase = history.phase = "frozen"
            learn.fit_one_cycle(config.epochs_frozen, lr, cbs=[keep_best, history])
        if config.epochs > 0:
            learn.unfreeze()
            lr_max = config.lr_unfrozen
            if lr_iters:
                found, lrs, losses = _lr_find(learn, lr_iters)
                logger.info("lr_find (unfrozen): valley %.3g", found)
                if is_main:
                    plots["lr_find_unfrozen"] = plot_lr_find(lrs, losses, found, out / "lr_find_unfrozen.png",
                                                             title=f"lr_find, unfrozen ({spec.name}, {config.size} px)").name
                lr_info["unfrozen_lr_find"] = found
                if lr_max is None:
                    lr_max = found
            if lr_max is None:  # lr_find off and only --lr given
                lr_max = float(config.lr) / 10
            lr_info["unfrozen"] = [float(lr_max) / 10, float(lr_max)]
            lr_info["unfrozen_source"] = "--lr-unfrozen" if config.lr_unfrozen is not None else (
                "lr_find valley" if lr_iters else "--lr / 10")
            keep_best.phase = history.phase = "unfrozen"
            learn.fit_one_cycle(config.epochs, slice(lr_max / 10, lr_max), cbs=[keep_best, history])
    fit_s = time.perf_counter() - t_fit
    learn.model.eval()

    if not is_main:
        return TrainResult(out=out, package=out / "model", metrics={}, settings={}, seconds=time.perf_counter() - t_start)

    # ---- evaluation of the kept (best) epoch: valid, and test when there is one -------------
    def predict(split: str):
        with bar_ctx():
            probs, targs, losses = learn.get_preds(dl=data.dl(split), with_loss=True)
        return probs.float().numpy(), targs.numpy().astype(np.int64), losses.float().numpy()

    v_probs, v_targs, v_losses = predict("valid")
    valid_metrics = binary_metrics(v_probs, v_targs, tumor_index=TUMOR_INDEX, class_names=CLASS_NAMES)
    valid_metrics["leaky"] = leaky
    test_metrics = None
    if "test" in data.items:
        t_probs, t_targs, _ = predict("test")
        test_metrics = binary_metrics(t_probs, t_targs, tumor_index=TUMOR_INDEX, class_names=CLASS_NAMES)
        test_metrics["leaky"] = bool(getattr(splits["test"], "leaky", False))

    # ---- plots ------------------------------------------------------------------------------
    plots["losses"] = plot_losses(history.batches, history.epochs, out / "losses.png").name
    note = " (LEAKY split)" if leaky else ""
    plots["confusion_matrix"] = plot_confusion_matrix(
        np.asarray(valid_metrics["confusion_matrix"]), CLASS_NAMES, out / "confusion_matrix.png",
        title=f"valid{note}: accuracy {valid_metrics['accuracy']:.4f}").name
    k = min(config.top_losses, len(v_losses))
    top = np.argsort(-v_losses, kind="stable")[:k]
    valid_ds = data.datasets["valid"]
    top_patches = np.stack([np.asarray(valid_ds[int(i)][0]) for i in top]) if k else np.zeros((0, 96, 96, 3), np.uint8)
    cams = np.zeros((0, 1, 1), np.float32)
    if k:
        x = _valid_inputs(data, top_patches, device)
        cams = gradcam(learn.model, x, layer=learn.model[0], class_idx=torch.as_tensor(v_probs[top].argmax(1)))
    rows = [{"index": int(i), "true": CLASS_NAMES[v_targs[i]], "pred": CLASS_NAMES[int(v_probs[i].argmax())],
             "loss": float(v_losses[i]), "p_tumor": float(v_probs[i, TUMOR_INDEX])} for i in top]
    plots["top_losses_gradcam"] = plot_top_losses_gradcam(
        top_patches, cams, rows, out / "top_losses_gradcam.png",
        title=f"top {k} valid losses{note}, Grad-CAM of the predicted class").name

    # ---- metrics, settings, export ------------------------------------------------------------
    best_phase, best_epoch = keep_best.best_at or (None, None)
    best_row = next((e for e in history.epochs if (e["phase"], e["epoch"]) == (best_phase, best_epoch)), None)
    settings = {
        **config.to_dict(),
        "resolved": {
            "arch": spec.name, "arch_source": spec.source, "body_init": learn.body_init,
            "weights_file": (str(config.weights) if config.weights else
                             (spec.weights_file if learn.body_init == "imagenet" else None)),
            "mean": list(spec.mean), "std": list(spec.std), "device": str(device), "precision": precision,
            "workers": workers, "world_size": max(world, 1), "layout": layout, "lr": lr_info,
            "lr_find_iters": lr_iters, "train_batches_per_epoch": n_batches,
            "class_names": list(CLASS_NAMES), "tumor_index": TUMOR_INDEX,
            "augmentation": _describe_augment(config.augment),
            "resize": f"96 -> {config.size} px, bilinear antialiased (= inference Preprocess)" if config.size != 96
            else "none (native 96 px)",
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "fastai": fastai.__version__},
        },
    }
    metrics = {
        "leaky": leaky,
        "leaky_note": LEAKY_NOTE if leaky else None,
        "layout": layout,
        "monitor": config.monitor,
        "splits": counts,
        "epochs": history.epochs,
        "best": {"phase": best_phase, "epoch": best_epoch,
                 "global_epoch": None if best_row is None else best_row["global_epoch"],
                 config.monitor: _num(keep_best.best)},
        "valid": valid_metrics,
        "test": test_metrics,
        "lr": lr_info,
        "top_losses": rows,
        "seconds": {"fit": round(fit_s, 2)},
        "plots": plots,
        "synthetic_data": synthetic,
    }
    extra = {
        "synthetic": synthetic,
        "training": {
            "data": str(config.data.resolve()), "layout": layout, "leaky": leaky, "splits": counts,
            "data_summary": {k: summary[k] for k in ("format", "label", "split_by", "synthetic") if k in summary},
            "recipe": {"arch": spec.name, "arch_source": spec.source, "body_init": learn.body_init,
                       "input_size": config.size, "epochs_frozen": config.epochs_frozen, "epochs": config.epochs,
                       "batch_size": config.batch_size, "wd": config.wd, "lr": lr_info, "seed": config.seed,
                       "valid_fraction": config.valid_fraction, "test_fraction": config.test_fraction,
                       "monitor": config.monitor, "augmentation": config.augment, "precision": precision},
            "best": metrics["best"],
        },
        "metrics": {"valid": _headline(valid_metrics), "test": None if test_metrics is None else _headline(test_metrics),
                    "leaky": leaky},
    }
    cfg = learner_config(learn, arch=spec.name, size=config.size, mean=spec.mean, std=spec.std, extra=extra)
    export_learner(learn, package_dir, config=cfg, overwrite=config.overwrite)

    # self-check: the package through the inference path vs the learner on valid patches
    from wsi_toolkit.model_package import load_model_package

    pkg = load_model_package(package_dir)
    n_chk = min(64, len(valid_ds))
    chk = np.stack([np.asarray(valid_ds[i][0]) for i in range(n_chk)])
    diff = float(np.abs(pkg.predict_class_proba(torch.from_numpy(chk)).numpy() - v_probs[:n_chk]).max())
    metrics["export_parity_max_abs_diff"] = diff
    tol = 1e-4 if precision == "fp32" else 2e-2
    if diff > tol:
        logger.warning("exported package and learner disagree by %.3g on valid patches (tolerance %g)", diff, tol)
    else:
        logger.info("exported package matches the learner on %d valid patches (max |dp| %.2e)", n_chk, diff)
    metrics["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "settings.json").write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("done in %.1f s: valid accuracy %.4f, ROC AUC %s%s", metrics["seconds"]["total"],
                valid_metrics["accuracy"], valid_metrics["roc_auc"], " (LEAKY)" if leaky else "")
    return TrainResult(out=out, package=package_dir, metrics=metrics, settings=settings,
                       seconds=time.perf_counter() - t_start)


@contextlib.contextmanager
def _quiet(learn: Learner):
    """No progress bars and no printed epoch table (the epochs still go to the log)."""
    with learn.no_bar(), learn.no_logging():
        yield


def _describe_augment(augment: str) -> str:
    geometric, hed = parse_augment(augment)
    text = {"none": "no geometric augmentation",
            "flips": "horizontal and vertical flips (the article's), each with p=0.5",
            "dihedral": "dihedral (8 symmetries of the square: flips and 90-degree rotations)"}[geometric]
    return text + (" + H&E stain jitter (HED, sigma 0.05)" if hed else "") + ", train only"


def _headline(m: Mapping[str, Any]) -> dict:
    return {k: m[k] for k in ("n", "accuracy", "roc_auc", "leaky") if k in m}


def _valid_inputs(data: PatchData, patches_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, 96, 96, 3)`` patches through the validation batch transforms."""
    x = TensorImage(torch.from_numpy(patches_uint8).permute(0, 3, 1, 2).contiguous().to(device))
    return data.dls.valid.after_batch(x)
