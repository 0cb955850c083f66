"""``run.json``: the typed, versioned record of one finished slide.

:class:`RunRecord` is what :func:`wsi_toolkit.analysis.write_outputs` writes last into a slide's
folder (its presence with ``status: "ok"`` marks the slide finished) and what every reader of a
results folder (``wsi-eval``, ``summary.csv``, the skip/redo decision) loads with
:meth:`RunRecord.read` instead of indexing dict keys. The JSON keys are the field names below, in
this order; :data:`SCHEMA_VERSION` is written as ``schema_version`` and bumped whenever a key is
renamed or changes meaning. Records written before versioning (no ``schema_version``) are read as
version 0; their field names were the same except ``model.tumour_class`` and
``settings.run.mpp`` / ``output_key.mpp`` (now ``mpp_override``).

Frames and units: see ``docs/frames.md``. ``slide.mpp`` is the slide's level-0 um/px (after any
override), ``model.spacing_um_px`` the model's input um/px, ``heatmap.mpp`` um per heatmap pixel.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wsi_toolkit.atomic import write_json_atomic
from wsi_toolkit.errors import WsiToolkitError

__all__ = ["SCHEMA_VERSION", "RunRecord", "SlideInfo", "ModelInfo", "GridInfo", "Counts", "RunRecordError",
           "upgrade_output_key"]

#: Version of the ``run.json`` layout written by this code.
SCHEMA_VERSION = 1


class RunRecordError(WsiToolkitError, ValueError):
    """A ``run.json`` that is not valid JSON or not a run record this version can read."""


@dataclass(frozen=True)
class SlideInfo:
    """The slide as read: ``mpp`` is its level-0 um/px (metadata or ``--mpp``; ``mpp_source`` says
    which), ``mpp_metadata`` what the file itself says, (x, y) (None if nothing), ``level0_size`` (w, h)."""

    path: str
    backend: str
    vendor: str | None
    mpp: float
    mpp_source: str
    mpp_metadata: list[float] | None
    level0_size: list[int]
    level_count: int
    synthetic: bool


@dataclass(frozen=True)
class ModelInfo:
    """The model package: ``spacing_um_px`` and ``patch_size_pixels`` as in its config.json;
    ``calibration`` the temperature calibration applied to its logits (its config.json's
    ``wsi_toolkit.calibration``; None, absent from older records: none, i.e. temperature 1)."""

    path: str
    sha256: str
    architecture: str
    class_names: list[str]
    tumor_class: str
    patch_size_pixels: int
    spacing_um_px: float
    label_semantics: str
    synthetic: bool
    calibration: dict[str, Any] | None = None


@dataclass(frozen=True)
class GridInfo:
    """The patch grid in level-0 px: ``shape_rc`` cells, cell side ``cell_l0``, patch side
    ``patch_l0``; a patch starts ``offset_l0`` before its cell (x and y alike)."""

    shape_rc: list[int]
    cell_l0: float
    patch_l0: float
    offset_l0: float


@dataclass(frozen=True)
class Counts:
    n_patches: int
    tissue_mm2: float
    n_regions: int


@dataclass(frozen=True)
class RunRecord:
    """One finished slide. ``heatmap`` is :meth:`wsi_toolkit.heatmap.Heatmap.geometry`;
    ``settings``, ``output_key``, ``timings`` and ``versions`` are plain JSON objects (their keys
    are documented where they are made: :func:`wsi_toolkit.pipeline.output_key`,
    :class:`wsi_toolkit.analysis.RunConfig`). ``runtime`` (optional; absent from records written
    before it) says which runtime ran the model at which precision, what that changes, and why torch
    ran where OpenVINO was asked for (:func:`wsi_toolkit.runtime.select_runtime`). ``worker``
    (optional; written only by ``wsi-infer --ray``) says which node, device and process ran the slide
    (:class:`wsi_toolkit.scale.worker.SlideWorker`). ``uncertainty`` (optional; written only with
    ``wsi-infer --tta``): the TTA mode and the tissue area confidently tumour / confidently normal /
    uncertain, with the rule (:meth:`wsi_toolkit.analysis.SlideAnalysis.uncertainty_summary`)."""

    status: str
    synthetic: bool
    slide: SlideInfo
    model: ModelInfo
    settings: dict[str, Any]
    output_key: dict[str, Any] | None
    grid: GridInfo
    heatmap: dict[str, Any]
    counts: Counts
    slide_score: float
    tumor_area_mm2: float
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    runtime: dict[str, Any] | None = None
    worker: dict[str, Any] | None = None
    uncertainty: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("worker", "uncertainty"):  # single-process runs, runs without TTA: run.json as before
            if d[key] is None:
                del d[key]
        return {"schema_version": d.pop("schema_version"), **d}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a reader never sees half a record)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, *, source: str | os.PathLike[str] = "run.json") -> RunRecord:
        """Validate a parsed ``run.json``; raises :class:`RunRecordError` naming ``source`` and the key."""
        if not isinstance(d, dict):
            raise RunRecordError(f"{source}: not a JSON object")
        version = d.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise RunRecordError(f"{source}: schema_version must be a non-negative integer; got {version!r}")
        if version > SCHEMA_VERSION:
            raise RunRecordError(f"{source}: written by a newer wsi-toolkit (run.json schema {version}, this one "
                                 f"reads up to {SCHEMA_VERSION}); upgrade wsi-toolkit")
        d = _upgrade(d) if version < SCHEMA_VERSION else d
        try:
            parts = {
                "slide": _typed(SlideInfo, d.get("slide"), "slide", source),
                "model": _typed(ModelInfo, d.get("model"), "model", source),
                "grid": _typed(GridInfo, d.get("grid"), "grid", source),
                "counts": _typed(Counts, d.get("counts"), "counts", source),
            }
            plain = {f.name: d[f.name] for f in fields(cls) if f.name not in parts and f.name in d}
            missing = [f.name for f in fields(cls) if f.name not in d and f.name not in _OPTIONAL]
            if missing:
                raise RunRecordError(f"{source}: missing key(s) {missing}; not a finished wsi-infer run.json")
            rec = cls(**{**plain, **parts, "schema_version": SCHEMA_VERSION})
        except TypeError as exc:  # an unexpected nested key
            raise RunRecordError(f"{source}: {exc}") from None
        for name, kind in (("settings", dict), ("heatmap", dict), ("timings", dict), ("versions", dict)):
            if not isinstance(getattr(rec, name), kind):
                raise RunRecordError(f"{source}: {name} must be an object")
        return rec

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> RunRecord:
        """Load a ``run.json``; :class:`RunRecordError` when it is missing, not JSON or not a record."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RunRecordError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise RunRecordError(f"{path}: not valid JSON ({exc}); rerun the slide with wsi-infer --overwrite") \
                from None
        return cls.from_dict(doc, source=path)


_OPTIONAL = frozenset({"timings", "versions", "outputs", "runtime", "worker", "uncertainty", "schema_version",
                       "output_key"})


def _typed(kind: type, value: Any, key: str, source: str | os.PathLike[str]) -> Any:
    if not isinstance(value, dict):
        raise RunRecordError(f"{source}: {key} must be an object")
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(value))
    if missing:
        raise RunRecordError(f"{source}: {key} is missing {missing}")
    return kind(**{k: v for k, v in value.items() if k in names})


def upgrade_output_key(key: Any) -> Any:
    """An ``output_key`` of an older record in today's names (``mpp`` -> ``mpp_override``); a key
    without ``read_from`` was made before the option existed, reading the nearest level."""
    if isinstance(key, dict) and "mpp" in key and "mpp_override" not in key:
        key = {("mpp_override" if k == "mpp" else k): v for k, v in key.items()}
    if isinstance(key, dict) and "read_from" not in key:
        key = {**key, "read_from": "nearest"}
    return key


def _upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A version-0 record in version-1 names."""
    d = dict(d)
    if isinstance(d.get("model"), dict) and "tumour_class" in d["model"]:
        d["model"] = {("tumor_class" if k == "tumour_class" else k): v for k, v in d["model"].items()}
    if isinstance(d.get("settings"), dict) and isinstance(d["settings"].get("run"), dict):
        run = d["settings"]["run"]
        if "mpp" in run and "mpp_override" not in run:
            d["settings"] = {**d["settings"], "run": {("mpp_override" if k == "mpp" else k): v for k, v in run.items()}}
    d["output_key"] = upgrade_output_key(d.get("output_key"))
    return d
