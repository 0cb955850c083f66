"""The model package: the contract between training and inference, in WSInfer's format.

A model package is a directory with two files, exactly as the WSInfer model zoo publishes them::

    my-model/
      config.json            WSInfer model config, spec_version "1.0" (see below)
      torchscript_model.pt   the model as TorchScript: (N, 3, S, S) float32 -> (N, num_classes) logits

so a model trained here runs in WSInfer and QuPath's WSInfer extension, and WSInfer-zoo models run
here. ``config.json`` holds WSInfer's keys::

    {
      "spec_version": "1.0",
      "architecture": "resnet50",
      "num_classes": 2,
      "class_names": ["notumor", "tumor"],
      "patch_size_pixels": 96,
      "spacing_um_px": 0.972,
      "transform": [
        {"name": "Resize", "arguments": {"size": 224}},
        {"name": "ToTensor"},
        {"name": "Normalize", "arguments": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
      ],
      "wsi_toolkit": {"label_semantics": "centre", "tumor_class": "tumor", "sha256": "..."}
    }

Everything of ours lives in the one namespaced object ``"wsi_toolkit"`` (which class is the tumour,
what a label means, provenance, metrics, the sha256 of the weights, a "synthetic" flag).
WSInfer's JSON schema does not forbid extra top-level keys, so WSInfer reads our packages as they
are; ``ModelConfig.to_dict(wsinfer_strict=True)`` still writes WSInfer's keys only. Unknown
top-level keys found on load are kept and written back, not rejected.

The weights are read with :func:`torch.jit.load` (TorchScript) only, never ``torch.load``. That is
not a sandbox: a TorchScript archive is code (its ``forward`` runs whatever it was compiled with)
and ``torch.jit.load`` reads the archive's pickled constants with a restricted unpickler. Load
packages only from sources you trust, as you would run their scripts (README, "What a model
package may do").

Preprocessing is done by :class:`Preprocess`, on uint8 patches already on the GPU when inference
runs there; it is the one place that interprets the ``transform`` list.

Example::

    save_model_package("pcam-resnet50", model, pcam_config(input_size=224))
    pkg = load_model_package("pcam-resnet50", device="cuda")
    prob = pkg.predict_proba(patches)   # (N, 96, 96, 3) uint8 -> (N,) float32 P(tumour), on the CPU
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from wsi_toolkit.errors import ModelPackageError
from wsi_toolkit.limits import PATCH_PX_RANGE, SPACING_RANGE_UM, in_range, range_text

__all__ = [
    "ModelPackageError",
    "TransformStep",
    "ModelConfig",
    "pcam_config",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TUMOR_CLASS_SYNONYMS",
    "CONFIG_NAME",
    "read_config_json",
    "TORCHSCRIPT_NAME",
    "Preprocess",
    "ModelPackage",
    "load_model_package",
    "save_model_package",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
TORCHSCRIPT_NAME = "torchscript_model.pt"
NAMESPACE = "wsi_toolkit"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Class names (compared case-insensitively, spaces and hyphens read as "_") taken to mean tumour
#: when a config does not name its tumour class explicitly.
TUMOR_CLASS_SYNONYMS = (
    "tumor", "tumour", "tumor_tissue", "tumour_tissue", "mets", "metastasis", "metastases",
    "cancer", "positive", "malignant",
)

#: WSInfer's top-level keys (spec 1.0), in the order WSInfer-zoo configs write them.
WSINFER_KEYS = (
    "spec_version", "architecture", "num_classes", "class_names", "patch_size_pixels",
    "spacing_um_px", "transform",
)

# PCam: 96x96 px patches at 10x, i.e. 4 x 0.243 um/px (level 2 of a Radboud Camelyon16 slide).
PCAM_PATCH_PX = 96
PCAM_SPACING_UM_PX = 0.972

LabelSemantics = Literal["centre", "whole"]
_LABEL_SEMANTICS = ("centre", "whole")


# --------------------------------------------------------------------------------------------
# Small helpers: immutable JSON values, type checks


def _freeze(value: Any, *, field: str) -> Any:
    """A deep immutable copy of a JSON-like value (dict -> MappingProxyType, list -> tuple)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelPackageError(f"keys must be strings (JSON); got {k!r}", field=field)
            out[k] = _freeze(v, field=f"{field}.{k}")
        return MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, field=f"{field}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelPackageError(f"must be a finite number (JSON has no NaN/inf); got {value!r}", field=field)
        return value
    raise ModelPackageError(
        f"must hold JSON values only (dict, list, str, int, float, bool, None); got {type(value).__name__} "
        f"{value!r}; convert it first (e.g. float(x) for numpy scalars)", field=field)


def _thaw(value: Any) -> Any:
    """The inverse of :func:`_freeze`: plain dicts and lists, ready for ``json.dumps``."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


# --------------------------------------------------------------------------------------------
# Transform steps


def _check_resize(args: Mapping) -> None:
    unknown = set(args) - {"size", "antialias"}
    if unknown:
        raise ModelPackageError(
            f"unsupported Resize argument(s) {sorted(unknown)}; only 'size' (bilinear, antialiased) is "
            "supported", field="arguments")
    if "size" not in args:
        raise ModelPackageError("Resize needs 'size' (an int, pixels)", field="arguments.size")
    size = args["size"]

    def ok_side(s: Any) -> bool:
        return _is_int(s) and in_range(s, PATCH_PX_RANGE, integer=True)

    ok = ok_side(size) or (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(ok_side(s) for s in size) and size[0] == size[1])
    if not ok:
        raise ModelPackageError(
            f"Resize size must be an int in {range_text(PATCH_PX_RANGE, 'px')} (or [s, s]); got {_thaw(size)!r}",
            field="arguments.size")
    if args.get("antialias", True) is not True:
        raise ModelPackageError(
            "only antialias=true is supported (what WSInfer's PIL Resize does)", field="arguments.antialias")


def _check_to_tensor(args: Mapping) -> None:
    if args:
        raise ModelPackageError(f"ToTensor takes no arguments; got {dict(args)!r}", field="arguments")


def _check_normalize(args: Mapping) -> None:
    unknown = set(args) - {"mean", "std", "inplace"}
    if unknown:
        raise ModelPackageError(f"unknown Normalize argument(s) {sorted(unknown)}", field="arguments")
    for key in ("mean", "std"):
        if key not in args:
            raise ModelPackageError(f"Normalize needs '{key}' (3 numbers, one per RGB channel)",
                                    field=f"arguments.{key}")
        v = args[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) and math.isfinite(x) for x in v)):
            raise ModelPackageError(
                f"Normalize {key} must be 3 numbers (R, G, B); got {_thaw(v)!r}", field=f"arguments.{key}")
    if any(s <= 0 for s in args["std"]):
        raise ModelPackageError(f"Normalize std must be > 0; got {_thaw(args['std'])!r}", field="arguments.std")


# Registry: step name -> argument checker.
_STEP_CHECKS = {"Resize": _check_resize, "ToTensor": _check_to_tensor, "Normalize": _check_normalize}


@dataclass(frozen=True)
class TransformStep:
    """One item of WSInfer's ``transform`` list: ``{"name": ..., "arguments": {...}}``.

    ``Resize``: ``{"size": int}`` (the shorter side, as torchvision's ``Resize(int)``; patches are
    square); ``ToTensor``: no arguments; ``Normalize``: ``{"mean": [r, g, b], "std": [r, g, b]}``.
    ``arguments`` is stored as a read-only mapping.
    """

    name: Literal["Resize", "ToTensor", "Normalize"]
    arguments: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.name not in _STEP_CHECKS:
            raise ModelPackageError(
                f"unknown transform {self.name!r}; WSInfer spec 1.0 knows {sorted(_STEP_CHECKS)}", field="name")
        args = {} if self.arguments is None else self.arguments
        if not isinstance(args, Mapping):
            raise ModelPackageError(f"must be an object; got {args!r}", field="arguments")
        frozen = _freeze(args, field="arguments")
        _STEP_CHECKS[self.name](frozen)
        object.__setattr__(self, "arguments", frozen)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformStep:
        if not isinstance(d, Mapping):
            raise ModelPackageError(f"must be an object like {{\"name\": \"ToTensor\"}}; got {d!r}")
        unknown = set(d) - {"name", "arguments"}
        if unknown:
            raise ModelPackageError(
                f"unknown key(s) {sorted(unknown)}; a transform item has only 'name' and 'arguments'")
        if "name" not in d:
            raise ModelPackageError("is missing", field="name")
        return cls(d["name"], d.get("arguments") or {})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.arguments:
            out["arguments"] = _thaw(self.arguments)
        return out

    @property
    def size(self) -> int | None:
        """Resize's target size in pixels (None for other steps)."""
        if self.name != "Resize":
            return None
        s = self.arguments["size"]
        return int(s if _is_int(s) else s[0])

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _to_step(item: Any) -> TransformStep:
    return item if isinstance(item, TransformStep) else TransformStep.from_dict(item)


# --------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class ModelConfig:
    """A validated WSInfer model config (spec 1.0) plus our namespaced ``"wsi_toolkit"`` object.

    Construct with :meth:`from_dict` (a parsed ``config.json``) or :func:`pcam_config`. Invalid
    values raise :class:`ModelPackageError` naming the field. Collections are stored immutably
    (tuples, read-only mappings).

    - ``tumor_class``: which class is "tumour" (``wsi_toolkit.tumor_class``); ``None`` = found by
      name, see :meth:`tumor_index`.
    - ``label_semantics``: ``"centre"`` when a label speaks of the patch's centre region (PCam:
      tumour in the centre 32x32 of 96x96), ``"whole"`` when it speaks of the whole patch.
    - ``extra``: the rest of the ``"wsi_toolkit"`` object (provenance, metrics, sha256, ...).
    - ``unknown``: other top-level keys found on load, kept and written back.
    """

    architecture: str
    num_classes: int
    class_names: tuple[str, ...]
    patch_size_pixels: int
    spacing_um_px: float
    transform: tuple[TransformStep, ...]
    spec_version: str = "1.0"
    tumor_class: str | None = None
    label_semantics: LabelSemantics = "centre"
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    unknown: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        def fail(fld: str, problem: str):
            raise ModelPackageError(problem, field=fld)

        if not isinstance(self.spec_version, str) or self.spec_version.split(".")[0] != "1":
            fail("spec_version", f"unsupported spec_version {self.spec_version!r}; this reader knows WSInfer's '1.0'")
        if not isinstance(self.architecture, str) or not self.architecture.strip():
            fail("architecture", f"must be a non-empty string (e.g. 'resnet50'); got {self.architecture!r}")
        if not (_is_int(self.num_classes) and self.num_classes >= 1):
            fail("num_classes", f"must be an integer >= 1; got {self.num_classes!r}")
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, Sequence):
            fail("class_names", f"must be a list of strings; got {names!r}")
        names = tuple(names)
        for i, n in enumerate(names):
            if not isinstance(n, str) or not n:
                fail(f"class_names[{i}]", f"must be a non-empty string; got {n!r}")
        if len(names) != self.num_classes:
            fail("class_names", f"has {len(names)} name(s) {list(names)} but num_classes is {self.num_classes}; "
                                "give one name per model output")
        if len(set(names)) != len(names):
            fail("class_names", f"names must be unique; got {list(names)}")
        object.__setattr__(self, "class_names", names)
        # Ranges and why: wsi_toolkit.limits (8..4096 px: no network sees anything in fewer than 8 px,
        # 4096 is 16x the largest published WSI patch; 0.05..20 um/px: finer than any scanner samples /
        # a 96 px patch over 2 mm).
        if not (_is_int(self.patch_size_pixels) and in_range(self.patch_size_pixels, PATCH_PX_RANGE, integer=True)):
            fail("patch_size_pixels", f"must be an integer number of pixels in {range_text(PATCH_PX_RANGE, 'px')} "
                                      f"(PCam: 96); got {self.patch_size_pixels!r}")
        if not (_is_number(self.spacing_um_px) and in_range(self.spacing_um_px, SPACING_RANGE_UM)):
            fail("spacing_um_px", f"must be the model's micrometres per pixel in "
                                  f"{range_text(SPACING_RANGE_UM, 'um/px')} (PCam: 0.972); got {self.spacing_um_px!r}")
        object.__setattr__(self, "spacing_um_px", float(self.spacing_um_px))

        tf = self.transform
        if isinstance(tf, (str, Mapping)) or not isinstance(tf, Sequence):
            fail("transform", f"must be a list of steps (Resize / ToTensor / Normalize); got {_thaw(tf)!r}")
        steps = []
        for i, item in enumerate(tf):
            try:
                steps.append(_to_step(item))
            except ModelPackageError as e:
                raise e._located(prefix=f"transform[{i}]") from None
        kinds = [s.name for s in steps]
        if kinds.count("ToTensor") != 1:
            fail("transform", f"needs exactly one ToTensor step (uint8 image -> float tensor); got steps {kinds}")
        t_idx = kinds.index("ToTensor")
        for i, k in enumerate(kinds):
            if k == "Normalize" and i < t_idx:
                fail(f"transform[{i}]", "Normalize must come after ToTensor (it works on float tensors)")
        object.__setattr__(self, "transform", tuple(steps))

        if self.tumor_class is not None and self.tumor_class not in names:
            fail(f"{NAMESPACE}.tumor_class",
                 f"{self.tumor_class!r} is not one of class_names {list(names)}")
        if self.label_semantics not in _LABEL_SEMANTICS:
            fail(f"{NAMESPACE}.label_semantics",
                 f"must be one of {list(_LABEL_SEMANTICS)}; got {self.label_semantics!r}")

        if not isinstance(self.extra, Mapping):
            fail(NAMESPACE, f"must be an object; got {self.extra!r}")
        clash = {"tumor_class", "label_semantics"} & set(self.extra)
        if clash:
            fail(NAMESPACE, f"{sorted(clash)} are ModelConfig fields; pass them as tumor_class= / "
                            "label_semantics=, not inside extra")
        object.__setattr__(self, "extra", _freeze(self.extra, field=NAMESPACE))
        if not isinstance(self.unknown, Mapping):
            fail("unknown", f"must be a mapping of top-level keys; got {self.unknown!r}")
        clash = (set(WSINFER_KEYS) | {NAMESPACE}) & set(self.unknown)
        if clash:
            fail("unknown", f"{sorted(clash)} are known keys, not unknown ones")
        object.__setattr__(self, "unknown", _freeze(self.unknown, field="unknown"))

    # -- dict / JSON -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = CONFIG_NAME) -> ModelConfig:
        """Validate a parsed ``config.json``. Errors are :class:`ModelPackageError` naming the field and
        ``source``. A config without a ``"wsi_toolkit"`` object comes from elsewhere (e.g. the WSInfer
        zoo), whose labels speak of the whole patch: its ``label_semantics`` is ``"whole"``."""
        try:
            if not isinstance(d, Mapping):
                raise ModelPackageError(f"the config must be a JSON object; got {type(d).__name__}")
            for key in WSINFER_KEYS:
                if key not in d:
                    raise ModelPackageError("is missing (required by WSInfer's config spec 1.0)", field=key)
            ours = d.get(NAMESPACE, None)
            has_ours = ours is not None
            ours = {} if ours is None else ours
            if not isinstance(ours, Mapping):
                raise ModelPackageError(f"must be an object; got {ours!r}", field=NAMESPACE)
            ours = dict(ours)
            legacy = ours.pop("tumour_class", None)  # packages written before 0.2 spelt it this way
            tumor_class = ours.pop("tumor_class", legacy)
            label_semantics = ours.pop("label_semantics", "centre" if has_ours else "whole")
            unknown = {k: v for k, v in d.items() if k not in WSINFER_KEYS and k != NAMESPACE}
            return cls(
                architecture=d["architecture"], num_classes=d["num_classes"], class_names=d["class_names"],
                patch_size_pixels=d["patch_size_pixels"], spacing_um_px=d["spacing_um_px"],
                transform=d["transform"], spec_version=d["spec_version"], tumor_class=tumor_class,
                label_semantics=label_semantics, extra=ours, unknown=unknown,
            )
        except ModelPackageError as e:
            raise e._located(source=source) from None

    def to_dict(self, *, wsinfer_strict: bool = False) -> dict[str, Any]:
        """Plain JSON-ready dict in WSInfer's key order. ``wsinfer_strict=True`` keeps WSInfer's
        keys only (drops the ``"wsi_toolkit"`` object and unknown keys)."""
        out: dict[str, Any] = {
            "spec_version": self.spec_version,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "patch_size_pixels": self.patch_size_pixels,
            "spacing_um_px": self.spacing_um_px,
            "transform": [s.to_dict() for s in self.transform],
        }
        if wsinfer_strict:
            return out
        out.update(_thaw(self.unknown))
        ours: dict[str, Any] = {"label_semantics": self.label_semantics}
        if self.tumor_class is not None:
            ours["tumor_class"] = self.tumor_class
        ours.update(_thaw(self.extra))
        out[NAMESPACE] = ours
        return out

    def to_json(self, *, wsinfer_strict: bool = False) -> str:
        return json.dumps(self.to_dict(wsinfer_strict=wsinfer_strict), indent=2, allow_nan=False) + "\n"

    def with_extra(self, **items: Any) -> ModelConfig:
        """A copy with ``items`` added to (or replacing keys of) the ``"wsi_toolkit"`` object."""
        return replace(self, extra={**_thaw(self.extra), **items})

    def __hash__(self) -> int:
        return hash(self.to_json())

    # -- derived -----------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        """Side in pixels of the model's input: the last Resize's size, else ``patch_size_pixels``."""
        sizes = [s.size for s in self.transform if s.name == "Resize"]
        return int(sizes[-1]) if sizes else int(self.patch_size_pixels)

    @property
    def is_synthetic(self) -> bool:
        return bool(self.extra.get("synthetic", False))

    def tumor_index(self) -> int:
        """Index into ``class_names`` of the tumour class.

        The explicit ``tumor_class`` if set; else 0 for a single-output (sigmoid) model; else the
        first class whose name is one of :data:`TUMOR_CLASS_SYNONYMS` (case-insensitive).
        """
        if self.tumor_class is not None:
            return self.class_names.index(self.tumor_class)
        if self.num_classes == 1:
            return 0
        for i, name in enumerate(self.class_names):
            if _norm_name(name) in TUMOR_CLASS_SYNONYMS:
                return i
        raise ModelPackageError(
            f"no class looks like tumour among class_names {list(self.class_names)} (looked for "
            f"{', '.join(TUMOR_CLASS_SYNONYMS)}); name it in config.json as "
            f'"{NAMESPACE}": {{"tumor_class": "<one of the class names>"}}',
            field=f"{NAMESPACE}.tumor_class")


def pcam_config(
    *,
    architecture: str = "resnet50",
    input_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_names: Sequence[str] = ("notumor", "tumor"),
    extra: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """The config of a PCam patch classifier: 96x96 px patches at 0.972 um/px, labels about the
    centre 32x32 region (``label_semantics="centre"``), upsampled to ``input_size`` (the article's
    recipe: 224) and normalised with ``mean``/``std`` (ImageNet's by default).

    The transform is WSInfer's ``[Resize(input_size), ToTensor, Normalize]``, Resize included even
    at the native 96 px: WSInfer reads every patch at level 0 (384 px on a 0.243 um/px slide) and
    only its Resize step brings it to the model's input (without it WSInfer would run the network on
    384 px patches, 16x the work). Our :class:`Preprocess` skips a Resize to the size it already has.
    For two classes the tumour class is ``class_names[1]`` (PCam label 1).
    """
    if not (_is_int(input_size) and input_size > 0):
        raise ModelPackageError(f"input_size must be a positive integer; got {input_size!r}", field="input_size")
    steps = [TransformStep("Resize", {"size": input_size}), TransformStep("ToTensor")]
    steps.append(TransformStep("Normalize", {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}))
    class_names = tuple(class_names)
    return ModelConfig(
        architecture=architecture,
        num_classes=len(class_names),
        class_names=class_names,
        patch_size_pixels=PCAM_PATCH_PX,
        spacing_um_px=PCAM_SPACING_UM_PX,
        transform=tuple(steps),
        tumor_class=class_names[1] if len(class_names) == 2 else None,
        label_semantics="centre",
        extra=dict(extra or {}),
    )


# --------------------------------------------------------------------------------------------
# Preprocessing


class Preprocess(torch.nn.Module):
    """The config's ``transform`` list on batches of uint8 patches, on any device.

    Input ``(N, H, W, 3)`` uint8 RGB; output ``(N, 3, S, S)`` float32, ``S = config.input_size``.

    - ``ToTensor``: uint8 -> float32 / 255, NHWC -> NCHW (torchvision's ``ToTensor``).
    - ``Resize``: ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on the
      float image; this is exactly what torchvision's tensor ``Resize(size, antialias=True)`` does
      on a float tensor. ``Resize(int)`` scales the shorter side (torchvision's rule); it is skipped
      when the image already has that size.
    - ``Normalize``: ``(x - mean) / std`` per channel.

    Steps run in the config's order. The uint8 -> [0, 1] scaling is done first, whatever the
    position of ``ToTensor``: resizing is linear, so resizing and then scaling by 1/255 equals
    scaling and then resizing. WSInfer's own order ``Resize, ToTensor, Normalize`` resizes a PIL
    uint8 image, whose result is rounded to whole grey levels; resizing in float skips that
    rounding (differences of at most ~1/255 per pixel, and PIL's filter differs slightly).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.steps = tuple(config.transform)

    def forward(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        x = patches_uint8
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            desc = (f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
            raise ModelPackageError(f"Preprocess expects (N, H, W, 3) uint8 RGB patches; got {desc}")
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        for step in self.steps:
            if step.name == "Resize":
                x = _resize(x, step.size, exact=not _is_int(step.arguments["size"]))
            elif step.name == "Normalize":
                mean = torch.as_tensor(step.arguments["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                std = torch.as_tensor(step.arguments["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                x = (x - mean) / std
            # ToTensor: done above (see the class docstring).
        return x.contiguous()

    def extra_repr(self) -> str:
        return ", ".join(json.dumps(s.to_dict()) for s in self.steps)


def _resize(x: torch.Tensor, size: int, *, exact: bool = False) -> torch.Tensor:
    """torchvision's ``Resize(size)`` (shorter side -> size; ``exact``: ``Resize([size, size])``)
    on float NCHW, bilinear, antialiased."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if exact:
        oh, ow = size, size
    else:
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        oh, ow = (new_short, new_long) if h <= w else (new_long, new_short)
    if (oh, ow) == (h, w):
        return x
    return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------
# The package on disk


@contextlib.contextmanager
def quiet_torchscript_deprecation():
    """TorchScript is WSInfer's format, so its FutureWarnings ("torch.jit.* is deprecated") are
    expected here; silence only those, only around our own jit calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated", category=FutureWarning)
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelPackage:
    """A loaded model package. ``model`` maps ``(N, 3, S, S)`` normalised float32 to logits."""

    path: Path
    config: ModelConfig
    model: torch.nn.Module
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    preprocess: Preprocess = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.device = torch.device(self.device)
        self.preprocess = Preprocess(self.config)

    @torch.inference_mode()
    def predict_class_proba(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 patches -> ``(N, num_classes)`` float32 probabilities on the CPU
        (softmax over classes; sigmoid for a one-output model)."""
        if not isinstance(patches_uint8, torch.Tensor):
            patches_uint8 = torch.as_tensor(patches_uint8)
        x = self.preprocess(patches_uint8.to(self.device, non_blocking=True))
        logits = _as_logits(self.model(x), self.config)
        probs = torch.sigmoid(logits.float()) if self.config.num_classes == 1 else torch.softmax(logits.float(), dim=1)
        return probs.cpu()

    def predict_proba(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 patches -> ``(N,)`` float32 tumour probability on the CPU."""
        return self.predict_class_proba(patches_uint8)[:, self.config.tumor_index()].contiguous()


def _as_logits(out: Any, config: ModelConfig, *, source: str | None = None) -> torch.Tensor:
    """Model output as ``(N, num_classes)``; a one-output model may return ``(N,)``."""
    if not isinstance(out, torch.Tensor):
        raise ModelPackageError(f"the model must return one tensor of logits; got {type(out).__name__}",
                                source=source)
    if out.ndim == 1 and config.num_classes == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[1] != config.num_classes:
        got = out.shape[1] if out.ndim == 2 else f"output shape {tuple(out.shape)}"
        raise ModelPackageError(
            f"class count mismatch: config expects num_classes={config.num_classes} "
            f"(class_names {list(config.class_names)}), got {got} from the model "
            f"(output shape {tuple(out.shape)} for a batch of 1)", field="num_classes", source=source)
    return out


def _check_model_output(model: torch.nn.Module, config: ModelConfig, device: torch.device, *,
                        source: str) -> None:
    s = config.input_size
    with torch.inference_mode():
        try:
            out = model(torch.zeros(1, 3, s, s, device=device))
        except Exception as e:  # noqa: BLE001 - report any model failure as a package error
            raise ModelPackageError(
                f"the model fails on a (1, 3, {s}, {s}) input (input_size from the config's transform): "
                f"{type(e).__name__}: {e}", source=source) from e
        _as_logits(out, config, source=source)


#: A config.json is a few hundred bytes; anything past this is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 * 2**20


def read_config_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of a ``config.json``; :class:`ModelPackageError` naming the file when it is larger
    than :data:`MAX_CONFIG_BYTES`, not UTF-8, not JSON, nested too deeply, or has NaN/Infinity."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelPackageError(f"{size:,} bytes; a model config is a small JSON object (at most "
                                    f"{MAX_CONFIG_BYTES:,} bytes are read)", source=path)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelPackageError(f"not UTF-8 text ({e})", source=path) from None
    except OSError as e:
        raise ModelPackageError(f"cannot be read ({e.strerror or e})", source=path) from None

    def no_constant(name: str) -> Any:
        raise ModelPackageError(f"{name} is not a JSON number (JSON has no NaN/Infinity); write a finite number",
                                source=path)

    try:
        return json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ModelPackageError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                                source=path) from None
    except ModelPackageError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ModelPackageError(f"not valid JSON ({e})", source=path) from None
    except RecursionError:
        raise ModelPackageError("nested too deeply to be a model config (thousands of [ or {)", source=path) from None


def load_model_package(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                       verify_sha256: bool = True) -> ModelPackage:
    """Load and validate a model package directory (``config.json`` + ``torchscript_model.pt``).

    The weights are read with ``torch.jit.load`` only (TorchScript, which reads the archive's
    pickled constants with a restricted unpickler, and whose code runs on every forward pass:
    load only trusted packages). The
    config's class count is checked against the model's output on a zero batch of one patch; a
    recorded ``wsi_toolkit.sha256`` must match the file. Errors: :class:`ModelPackageError` naming
    the file (and the field).
    """
    root = Path(path)
    device = torch.device(device)
    if not root.exists():
        raise ModelPackageError(f"model package {str(root)!r} does not exist; pass the directory holding "
                                f"{CONFIG_NAME} and {TORCHSCRIPT_NAME}")
    if not root.is_dir():
        raise ModelPackageError(f"model package {str(root)!r} is not a directory; pass the directory holding "
                                f"{CONFIG_NAME} and {TORCHSCRIPT_NAME}")
    cfg_path, pt_path = root / CONFIG_NAME, root / TORCHSCRIPT_NAME
    if not cfg_path.is_file():
        raise ModelPackageError(f"missing; a model package holds {CONFIG_NAME} and {TORCHSCRIPT_NAME}",
                                source=cfg_path)
    raw = read_config_json(cfg_path)
    config = ModelConfig.from_dict(raw, source=cfg_path)
    if not pt_path.is_file():
        raise ModelPackageError(f"missing; a model package holds {CONFIG_NAME} and {TORCHSCRIPT_NAME}",
                                source=pt_path)
    sha = _sha256(pt_path)
    recorded = config.extra.get("sha256")
    if verify_sha256 and recorded is not None and recorded != sha:
        raise ModelPackageError(
            f"sha256 {sha} does not match {recorded} recorded in {CONFIG_NAME} ({NAMESPACE}.sha256); "
            "the weights changed after export", source=pt_path)
    try:
        with quiet_torchscript_deprecation():
            model = torch.jit.load(str(pt_path), map_location=device)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError/... for bad archives
        first_line = (str(e).splitlines() or [""])[0]
        raise ModelPackageError(
            f"not a TorchScript archive torch.jit.load can read ({type(e).__name__}: {first_line}); "
            "export the model with torch.jit.trace/script and save_model_package", source=pt_path) from None
    model.eval()
    _check_model_output(model, config, device, source=str(root))
    logger.info("loaded model package %s (%s, %d classes, input %d px, sha256 %s)", root,
                config.architecture, config.num_classes, config.input_size, sha[:12])
    return ModelPackage(path=root, config=config, model=model, sha256=sha, device=device)


def _to_torchscript(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """Trace ``model`` (checked on a second random input), or script it if tracing fails."""
    if isinstance(model, torch.jit.ScriptModule):
        return model, "script"
    errors = []
    gen = torch.Generator().manual_seed(1)
    check = torch.randn(example.shape, generator=gen).to(example.device)
    with torch.no_grad():
        expected = model(check)
        try:
            with quiet_torchscript_deprecation():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(model, example, check_trace=False)
            got = traced(check)
            if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.shape == expected.shape \
                    and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                return traced, "trace"
            errors.append("trace: the traced model disagrees with the eager model on a second input")
        except Exception as e:  # noqa: BLE001
            errors.append(f"trace: {type(e).__name__}: {e}")
        try:
            with quiet_torchscript_deprecation():
                return torch.jit.script(model), "script"
        except Exception as e:  # noqa: BLE001
            errors.append(f"script: {type(e).__name__}: {e}")
    raise ModelPackageError("could not convert the model to TorchScript; " + "; ".join(errors))


def save_model_package(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    example_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``config`` as a model package directory at ``path``; returns ``path``.

    The model (in eval mode, on the CPU) is traced with a ``(1, 3, S, S)`` example,
    ``S = example_size or config.input_size`` (scripted instead if tracing fails or disagrees
    with the eager model; a ``ScriptModule`` is saved as it is). ``torchscript_model.pt`` is
    written first, its sha256 recorded in the config (``wsi_toolkit.sha256``), then
    ``config.json``; both go to a temporary directory beside ``path`` that is renamed into place,
    so a crash never leaves half a package. An existing non-empty ``path`` is refused unless
    ``overwrite=True``, and even then only when it looks like a model package.
    """
    dest = Path(path)
    if dest.exists():
        if not dest.is_dir():
            raise ModelPackageError(f"{str(dest)!r} exists and is not a directory")
        contents = list(dest.iterdir())
        if contents and not overwrite:
            raise ModelPackageError(f"{str(dest)!r} exists and is not empty; pass overwrite=True to replace it")
        if contents and not ({CONFIG_NAME, TORCHSCRIPT_NAME} & {p.name for p in contents}):
            raise ModelPackageError(f"{str(dest)!r} is not empty and does not look like a model package "
                                    f"(no {CONFIG_NAME} / {TORCHSCRIPT_NAME}); refusing to replace it")
    size = int(example_size or config.input_size)

    was_training = model.training
    src = model
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        src = copy.deepcopy(model).cpu()
    src.eval()
    try:
        example = torch.zeros(1, 3, size, size)
        scripted, method = _to_torchscript(src, example)
        _check_model_output(scripted, config, torch.device("cpu"), source="model passed to save_model_package")
    finally:
        model.train(was_training)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        pt = tmp / TORCHSCRIPT_NAME
        with quiet_torchscript_deprecation():
            scripted.save(str(pt))
        sha = _sha256(pt)
        export = {"torchscript": method, "example_size": size, "torch_version": torch.__version__}
        final_config = config.with_extra(sha256=sha, export=export)
        (tmp / CONFIG_NAME).write_text(final_config.to_json(), encoding="utf-8")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            old.rmdir()
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved model package %s (%s, sha256 %s)", dest, method, sha[:12])
    return dest
