"""The model config (``config.json``): WSInfer's spec 1.0 plus our ``"wsi_toolkit"`` object. No torch.

``config.json`` holds WSInfer's keys::

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

Validation is data: :mod:`wsi_toolkit.model_package.schema` (a JSON Schema, then the cross-field
rules). A :class:`ModelConfig` is checked whichever way it is made (:meth:`ModelConfig.from_dict`,
the constructor, :func:`pcam_config`, :meth:`ModelConfig.with_extra`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from wsi_toolkit.errors import ModelPackageError
from wsi_toolkit.limits import PATCH_PX_RANGE, check_int
from wsi_toolkit.model_package.schema import NAMESPACE, check_config, check_step

__all__ = [
    "ModelPackageError",
    "TransformStep",
    "ModelConfig",
    "pcam_config",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TUMOR_CLASS_SYNONYMS",
    "CONFIG_NAME",
    "TORCHSCRIPT_NAME",
    "EXPORT_NAME",
    "MAX_CONFIG_BYTES",
    "read_config_json",
]

CONFIG_NAME = "config.json"
TORCHSCRIPT_NAME = "torchscript_model.pt"
#: The optional torch.export program beside the TorchScript (see :mod:`wsi_toolkit.model_package.io`).
EXPORT_NAME = "model.pt2"

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

#: A config.json is a few hundred bytes; anything past this is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 * 2**20

LabelSemantics = Literal["centre", "whole"]

# A key absent from a parsed config.json (the schema reports it as missing).
_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()


def _freeze(value: Any) -> Any:
    """A deep immutable copy of a (checked) JSON value: dict -> MappingProxyType, list -> tuple."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Plain dicts and lists (the inverse of :func:`_freeze`), ready for ``json.dumps`` and the
    schema; transform steps as their dicts; anything else as it is."""
    if isinstance(value, TransformStep):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


# --------------------------------------------------------------------------------------------
# Transform steps


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
        raw = {"name": self.name, "arguments": _thaw({} if self.arguments is None else self.arguments)}
        check_step(raw)
        object.__setattr__(self, "arguments", _freeze(raw["arguments"]))

    @classmethod
    def _checked(cls, name: str, arguments: Mapping[str, Any] | None) -> TransformStep:
        """A step from an item :func:`check_config` has already passed (not checked again)."""
        step = object.__new__(cls)
        object.__setattr__(step, "name", name)
        object.__setattr__(step, "arguments", _freeze(arguments or {}))
        return step

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformStep:
        raw = _thaw(d)
        check_step(raw)
        return cls._checked(raw["name"], raw.get("arguments"))

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
        return int(s if isinstance(s, int) else s[0])

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


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
        # What only a Python caller can get wrong; the rest is the schema's (wsi_toolkit.model_package.schema).
        if not isinstance(self.extra, Mapping):
            raise ModelPackageError(f"must be an object; got {self.extra!r}", field=NAMESPACE)
        clash = {"tumor_class", "label_semantics"} & set(self.extra)
        if clash:
            raise ModelPackageError(f"{sorted(clash)} are ModelConfig fields; pass them as tumor_class= / "
                                    "label_semantics=, not inside extra", field=NAMESPACE)
        if not isinstance(self.unknown, Mapping):
            raise ModelPackageError(f"must be a mapping of top-level keys; got {self.unknown!r}", field="unknown")
        clash = (set(WSINFER_KEYS) | {NAMESPACE}) & set(self.unknown)
        if clash:
            raise ModelPackageError(f"{sorted(clash)} are known keys, not unknown ones", field="unknown")
        try:
            raw = self._raw()
        except RecursionError:
            raise ModelPackageError("nested too deeply to be a model config") from None
        check_config(raw)
        ours = dict(raw[NAMESPACE])
        set_ = object.__setattr__
        set_(self, "class_names", tuple(raw["class_names"]))
        set_(self, "spacing_um_px", float(raw["spacing_um_px"]))
        set_(self, "transform", tuple(TransformStep._checked(s["name"], s.get("arguments")) for s in raw["transform"]))
        set_(self, "extra", _freeze({k: v for k, v in ours.items() if k not in ("tumor_class", "label_semantics")}))
        set_(self, "unknown", _freeze({k: raw[k] for k in self.unknown}))

    def _raw(self) -> dict[str, Any]:
        """The config as plain JSON values, in ``config.json``'s layout, for the schema."""
        out = {k: _thaw(getattr(self, k)) for k in WSINFER_KEYS if getattr(self, k) is not _MISSING}
        out.update(_thaw(self.unknown))
        ours: dict[str, Any] = {"label_semantics": self.label_semantics}
        if self.tumor_class is not None:
            ours["tumor_class"] = self.tumor_class
        ours.update(_thaw(self.extra))
        out[NAMESPACE] = ours
        return out

    # -- dict / JSON -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | os.PathLike = CONFIG_NAME) -> ModelConfig:
        """Validate a parsed ``config.json``. Errors are :class:`ModelPackageError` naming the field and
        ``source``. A config without a ``"wsi_toolkit"`` object comes from elsewhere (e.g. the WSInfer
        zoo), whose labels speak of the whole patch: its ``label_semantics`` is ``"whole"``."""
        try:
            if not isinstance(d, Mapping):
                raise ModelPackageError(f"the config must be a JSON object; got {type(d).__name__}")
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
            return cls(**{k: d.get(k, _MISSING) for k in WSINFER_KEYS}, tumor_class=tumor_class,
                       label_semantics=label_semantics, extra=ours, unknown=unknown)
        except ModelPackageError as e:
            raise e._located(source=source) from None

    def to_dict(self, *, wsinfer_strict: bool = False) -> dict[str, Any]:
        """Plain JSON-ready dict in WSInfer's key order. ``wsinfer_strict=True`` keeps WSInfer's
        keys only (drops the ``"wsi_toolkit"`` object and unknown keys)."""
        out = self._raw()
        if wsinfer_strict:
            return {k: out[k] for k in WSINFER_KEYS}
        return out

    def to_json(self, *, wsinfer_strict: bool = False) -> str:
        return json.dumps(self.to_dict(wsinfer_strict=wsinfer_strict), indent=2, allow_nan=False) + "\n"

    def with_extra(self, **items: Any) -> ModelConfig:
        """A copy with ``items`` added to (or replacing keys of) the ``"wsi_toolkit"`` object."""
        return replace(self, extra={**_thaw(self.extra), **items})

    def without_extra(self, *keys: str) -> ModelConfig:
        """A copy without ``keys`` in the ``"wsi_toolkit"`` object."""
        return replace(self, extra={k: v for k, v in _thaw(self.extra).items() if k not in keys})

    def __hash__(self) -> int:
        return hash(self.to_json())

    # -- derived -----------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        """Side in pixels of the model's input: the last Resize's size, else ``patch_size_pixels``."""
        sizes = [s.size for s in self.transform if s.name == "Resize" and s.size is not None]
        return int(sizes[-1]) if sizes else int(self.patch_size_pixels)

    @property
    def temperature(self) -> float:
        """The fitted temperature the logits are divided by before the softmax
        (``wsi_toolkit.calibration``, ``{"method": "temperature", "temperature": T, ...}``, written by
        ``pcam-train`` or ``pcam-eval --fit-temperature``); 1.0 for a package without calibration."""
        cal = self.extra.get("calibration")
        if isinstance(cal, Mapping) and cal.get("method") == "temperature":
            return float(cal["temperature"])
        return 1.0

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
    384 px patches, 16x the work). Our ``Preprocess`` skips a Resize to the size it already has.
    For two classes the tumour class is ``class_names[1]`` (PCam label 1).
    """
    input_size = check_int(input_size, "input_size", bounds=PATCH_PX_RANGE, unit="px", error=ModelPackageError)
    steps = [{"name": "Resize", "arguments": {"size": input_size}}, {"name": "ToTensor"},
             {"name": "Normalize", "arguments": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}}]
    class_names = tuple(class_names)
    return ModelConfig(
        architecture=architecture,
        num_classes=len(class_names),
        class_names=class_names,
        patch_size_pixels=PCAM_PATCH_PX,
        spacing_um_px=PCAM_SPACING_UM_PX,
        transform=tuple(steps),  # type: ignore[arg-type]  # validated into TransformSteps by __post_init__
        tumor_class=class_names[1] if len(class_names) == 2 else None,
        label_semantics="centre",
        extra=dict(extra or {}),
    )


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
