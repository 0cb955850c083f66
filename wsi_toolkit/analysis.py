"""One slide in memory: :func:`analyse_slide` computes, :func:`write_outputs` writes.

>>> import wsi_toolkit as wt                                                 # doctest: +SKIP
>>> analysis = wt.analyse_slide("slide.svs", wt.load_model_package("model/"))
>>> analysis.heatmap.prob.shape, analysis.slide_score, len(analysis.regions)
>>> wt.write_outputs(analysis, "out/slide")       # heatmap.tif, overlay.png, ..., run.json last

With test-time augmentation (``RunConfig(inference=InferenceConfig(tta="dihedral"))``) the heatmap is
the mean of the views' tumour probabilities and ``analysis.uncertainty`` their standard deviation on
the same cells, written as ``uncertainty.tif`` beside ``heatmap.tif``.

``analyse_slide`` reads the slide and runs the model but writes nothing: a notebook gets the
tissue mask, the patch grid, every patch's probabilities, the stitched :class:`~wsi_toolkit.heatmap.Heatmap`
and the tumour regions as objects. ``write_outputs`` turns a :class:`SlideAnalysis` into the files
``wsi-infer`` writes (each atomically, ``run.json`` last). ``wsi-infer`` is these two calls per
slide plus the batch machinery of :mod:`wsi_toolkit.pipeline` (skip/redo, locks, summary.csv).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.export import (
    UNCERTAINTY_TIFF_CONTENT,
    TumorRegion,
    render_overlay,
    tumor_regions,
    write_heatmap_tiff,
    write_regions_asap,
    write_regions_geojson,
    write_tiles_csv,
)
from wsi_toolkit.heatmap import Heatmap, MergeMode, stitch, uncertainty_summary
from wsi_toolkit.inference import InferenceConfig, run_inference
from wsi_toolkit.limits import check_fraction
from wsi_toolkit.model_package import ModelPackage, load_model_package
from wsi_toolkit.records import Counts, GridInfo, ModelInfo, RunRecord, SlideInfo
from wsi_toolkit.slide import Backend, SlideReader, open_slide
from wsi_toolkit.tiling import GridConfig, PatchGrid, make_grid
from wsi_toolkit.tissue import TissueConfig, TissueMask, detect_tissue

__all__ = ["RunConfig", "SlideAnalysis", "analyse_slide", "write_outputs", "output_key", "OUTPUT_FILES",
           "UNCERTAINTY_FILE"]

#: The files :func:`write_outputs` writes in a slide's folder, ``run.json`` (written last) included.
OUTPUT_FILES = ("heatmap.tif", "overlay.png", "tumor.geojson", "tumor.xml", "tiles.csv", "run.json")
#: Written besides :data:`OUTPUT_FILES` with test-time augmentation (``tta`` not ``"none"``).
UNCERTAINTY_FILE = "uncertainty.tif"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a slide's analysis (written to each ``run.json`` under ``settings.run``).

    ``mpp_override``: the slide's level-0 um/px to use instead of its metadata (``--mpp``; None =
    the metadata). ``stride_px=None`` and ``merge=None`` follow the model's label semantics: a
    centre-label model (PCam) gets stride ``patch_px // 3`` and the centre merge, others stride
    ``patch_px`` and the mean merge. ``threshold``: probability for tumour regions.
    ``min_tissue_fraction``: a grid cell is predicted when tissue covers at least this fraction.
    ``thumb_mpp``: um/px of the thumbnail tissue is found on. ``overwrite`` concerns the batch
    (:func:`wsi_toolkit.pipeline.run_batch`) only.
    """

    mpp_override: float | None = None
    stride_px: int | None = None
    merge: Literal["centre", "mean"] | None = None
    threshold: float = 0.5
    min_tissue_fraction: float = 0.5
    thumb_mpp: float = 8.0
    overwrite: bool = False
    backend: str = "auto"
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        check_fraction(self.threshold, "threshold")
        check_fraction(self.min_tissue_fraction, "min_tissue_fraction")
        if self.merge not in (None, "centre", "mean"):
            raise ConfigError(f"merge must be 'centre' or 'mean'; got {self.merge!r}")
        if self.stride_px is not None and not (isinstance(self.stride_px, int) and self.stride_px > 0):
            raise ConfigError(f"stride_px must be a positive integer; got {self.stride_px!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlideAnalysis:
    """Everything :func:`analyse_slide` found on one slide; nothing of it is on disk yet.

    ``probs``: (n_patches, n_outputs) model probabilities in ``grid`` order; ``p_tumor`` (n,) the
    tumour class's column; ``heatmap`` those stitched on the grid (one pixel per grid cell);
    ``regions`` the heatmap's regions at ``settings.threshold``; ``thumbnail`` the RGB thumbnail
    tissue was found on (``tissue.l0_per_px`` level-0 px per thumbnail px). ``slide_info`` and
    ``model_info`` are what ``run.json`` records of the slide and model; ``runtime`` which runtime
    ran the model at which precision (:attr:`wsi_toolkit.inference.InferenceResult.runtime`).
    With test-time augmentation (``settings.inference.tta``), ``p_tumor`` is the mean over the views,
    ``p_tumor_std`` (n,) their standard deviation and ``uncertainty`` that stitched like ``heatmap``
    (same cells, same merge); both None without. With MC-dropout (``settings.inference.mc_dropout``)
    the same over the dropout samples.
    """

    slide_path: Path
    package: ModelPackage
    settings: RunConfig
    slide_info: SlideInfo
    thumbnail: np.ndarray
    tissue: TissueMask
    grid_config: GridConfig
    tissue_config: TissueConfig
    merge: MergeMode
    grid: PatchGrid
    probs: np.ndarray
    p_tumor: np.ndarray
    heatmap: Heatmap
    regions: list[TumorRegion]
    slide_score: float
    tumor_area_mm2: float
    timings: dict[str, float]
    runtime: dict[str, Any] = field(default_factory=dict)
    p_tumor_std: np.ndarray | None = None
    uncertainty: Heatmap | None = None

    def uncertainty_summary(self) -> dict[str, Any] | None:
        """Tissue area (mm^2) confidently tumour / confidently normal / uncertain
        (:func:`wsi_toolkit.heatmap.uncertainty_summary`) and the method that made the spread
        (``"tta"`` with its mode, or ``"mc-dropout"`` with its samples and seed); None without one."""
        if self.uncertainty is None:
            return None
        inf = self.settings.inference
        method: dict[str, Any] = {"method": "tta", "tta": inf.tta}
        if inf.mc_dropout:
            method = {"method": "mc-dropout", "mc_dropout_samples": inf.mc_dropout,
                      "mc_dropout_seed": inf.mc_dropout_seed}
        return {**method,
                **uncertainty_summary(self.heatmap, self.uncertainty, threshold=self.settings.threshold)}

    @property
    def std_name(self) -> str:
        """Name of the spread in tiles.csv (``<std_name>_<class>``) and the regions' measurements
        (``max_<std_name>``): ``tta_std`` (TTA views) or ``mc_dropout_std`` (MC-dropout samples)."""
        return "mc_dropout_std" if self.settings.inference.mc_dropout else "tta_std"

    @property
    def synthetic(self) -> bool:
        """True when the slide or the model is SYNTHETIC (made by wsi-toolkit for tests/demos)."""
        return self.slide_info.synthetic or bool(self.package.config.extra.get("synthetic"))

    @property
    def class_names(self) -> list[str]:
        return list(self.package.config.class_names)

    def model_info(self) -> ModelInfo:
        cfg = self.package.config
        return ModelInfo(path=str(self.package.path), sha256=self.package.sha256, architecture=cfg.architecture,
                         class_names=self.class_names, tumor_class=self.class_names[cfg.tumor_index()],
                         patch_size_pixels=cfg.patch_size_pixels, spacing_um_px=cfg.spacing_um_px,
                         label_semantics=cfg.label_semantics, synthetic=bool(cfg.extra.get("synthetic")),
                         calibration=cfg.to_dict()["wsi_toolkit"].get("calibration"))


def grid_settings(package: ModelPackage, config: RunConfig) -> tuple[GridConfig, MergeMode]:
    """The grid and merge a run uses: the model's patch and spacing, the stride and merge of its
    label semantics unless ``config`` sets them."""
    cfg = package.config
    centre = cfg.label_semantics == "centre"
    stride = config.stride_px or (max(1, cfg.patch_size_pixels // 3) if centre else cfg.patch_size_pixels)
    merge: MergeMode = config.merge or ("centre" if centre else "mean")
    grid = GridConfig(patch_px=cfg.patch_size_pixels, spacing_um_px=cfg.spacing_um_px, stride_px=stride,
                      min_tissue_fraction=config.min_tissue_fraction)
    return grid, merge


def _with_reader_mpp(settings: RunConfig, reader: SlideReader) -> RunConfig:
    """``settings`` with the mpp override of a reader opened with one (``mpp_source == "override"``), so
    every later reader of the slide and ``run.json`` use it; a different ``settings.mpp_override`` is an
    error rather than a silent choice."""
    if reader.mpp_source != "override":
        return settings
    l0_mpp = float(reader.mpp)
    if settings.mpp_override is not None and not math.isclose(settings.mpp_override, l0_mpp, rel_tol=1e-9):
        raise ConfigError(f"{reader.path} was opened with mpp {l0_mpp:g} um/px (open_slide(..., mpp=...)) but "
                          f"settings.mpp_override is {settings.mpp_override:g}; pass one of them, or the same value")
    return replace(settings, mpp_override=l0_mpp)


def analyse_slide(slide: str | Path | SlideReader, package: ModelPackage | str | Path,
                  settings: RunConfig | None = None) -> SlideAnalysis:
    """Find tissue, classify its patches and stitch the heatmap of one slide; writes nothing.

    ``slide``: a slide file, or an open :class:`~wsi_toolkit.slide.SlideReader` (its file is
    read again by the patch reader). A reader opened with an mpp override
    (``open_slide(path, mpp=0.25)``) gives the analysis that override: thumbnail, grid, patch reader,
    INT8 calibration and ``run.json`` all use it, as with ``settings.mpp_override`` (a different
    ``settings.mpp_override`` is a :class:`~wsi_toolkit.errors.ConfigError`).
    ``package``: a loaded package or its folder.
    Raises a :class:`~wsi_toolkit.errors.WsiToolkitError` subclass when the slide or package is
    unusable (e.g. :class:`~wsi_toolkit.errors.NoPatchesError` when no tissue is found).
    """
    settings = settings or RunConfig()
    if not isinstance(package, ModelPackage):
        package = load_model_package(package)
    t0 = time.perf_counter()
    backend: Backend
    if isinstance(slide, SlideReader):
        slide_path, backend = Path(slide.path), cast(Backend, slide.backend)
        settings = _with_reader_mpp(settings, slide)
    else:
        slide_path, backend = Path(slide), cast(Backend, settings.backend)
    grid_cfg, merge = grid_settings(package, settings)
    tissue_cfg = TissueConfig(thumb_mpp=settings.thumb_mpp)
    with open_slide(slide_path, mpp=settings.mpp_override, backend=backend) as reader:
        slide_info = SlideInfo(
            path=str(slide_path), backend=reader.backend, vendor=reader.vendor, mpp=reader.mpp,
            mpp_source=reader.mpp_source,
            mpp_metadata=None if reader.mpp_metadata is None else [float(v) for v in reader.mpp_metadata],
            level0_size=list(reader.dimensions),
            level_count=reader.level_count, synthetic=reader.is_synthetic)
        thumb = reader.thumbnail(mpp=tissue_cfg.thumb_mpp)
        t_thumb = time.perf_counter()
        tissue = detect_tissue(thumb, l0_mpp=reader.mpp, config=tissue_cfg)
        t_tissue = time.perf_counter()
        grid = make_grid(l0_size=reader.dimensions, l0_mpp=reader.mpp, config=grid_cfg, tissue_mask=tissue.mask,
                         mask_l0_per_px=tissue.l0_per_px)
        reader_backend = reader.backend
    t_grid = time.perf_counter()
    result = run_inference(slide_path, grid, package, config=settings.inference, mpp=settings.mpp_override,
                           backend=reader_backend if isinstance(slide, SlideReader) else backend, desc=slide_path.name)
    t_stitch = time.perf_counter()
    tumor_idx = package.config.tumor_index()
    p_tumor = result.probs[:, tumor_idx] if result.probs.shape[1] > 1 else result.probs[:, 0]
    heatmap = stitch(grid, p_tumor, merge=merge)
    p_std = uncertainty = None
    if result.probs_std is not None:
        p_std = result.probs_std[:, tumor_idx] if result.probs_std.shape[1] > 1 else result.probs_std[:, 0]
        uncertainty = stitch(grid, p_std, merge=merge)
    regions = tumor_regions(heatmap, threshold=settings.threshold, uncertainty=uncertainty,
                            std_name="mc_dropout_std" if settings.inference.mc_dropout else "tta_std")
    stages = {"seconds_open_thumbnail": t_thumb - t0, "seconds_tissue_detect": t_tissue - t_thumb,
              "seconds_grid": t_grid - t_tissue, "seconds_tissue": t_grid - t0,
              "seconds_stitch_regions": time.perf_counter() - t_stitch}
    return SlideAnalysis(
        slide_path=slide_path, package=package, settings=settings, slide_info=slide_info, thumbnail=thumb,
        tissue=tissue, grid_config=grid_cfg, tissue_config=tissue_cfg, merge=merge, grid=grid, probs=result.probs,
        p_tumor=p_tumor, heatmap=heatmap, regions=regions,
        slide_score=float(p_tumor.max()) if len(p_tumor) else 0.0,
        tumor_area_mm2=float(sum(r.area_mm2 for r in regions)),
        timings={**result.timings(), **{k: round(v, 4) for k, v in stages.items()},
                 "seconds_analysis": round(time.perf_counter() - t0, 4)},
        runtime=result.runtime, p_tumor_std=p_std, uncertainty=uncertainty)


def write_outputs(analysis: SlideAnalysis, out_dir: str | Path, *, worker: dict[str, Any] | None = None) -> RunRecord:
    """Write :data:`OUTPUT_FILES` (and with TTA :data:`UNCERTAINTY_FILE`) for ``analysis`` into
    ``out_dir`` (created), each atomically,
    ``run.json`` last (it marks the slide finished); returns the record written as ``run.json``.
    ``worker``: which node and device ran it (``wsi-infer --ray``), recorded in ``run.json``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    a, cfg = analysis, analysis.package.config
    names = a.class_names
    if a.probs.shape[1] == 1:
        probs_by_class = {names[cfg.tumor_index()]: a.probs[:, 0]}
    else:
        probs_by_class = {name: a.probs[:, i] for i, name in enumerate(names)}
    extra = None if a.p_tumor_std is None else {f"{a.std_name}_{names[cfg.tumor_index()]}": a.p_tumor_std}
    write_tiles_csv(out_dir / "tiles.csv", a.grid, probs_by_class, extra_columns=extra)
    write_heatmap_tiff(out_dir / "heatmap.tif", a.heatmap)
    outputs = list(OUTPUT_FILES)
    if a.uncertainty is not None:
        write_heatmap_tiff(out_dir / UNCERTAINTY_FILE, a.uncertainty, content=UNCERTAINTY_TIFF_CONTENT)
        outputs.insert(1, UNCERTAINTY_FILE)
    write_regions_geojson(out_dir / "tumor.geojson", a.regions, slide_name=a.slide_path.name)  # ids: uuid5(name, i)
    write_regions_asap(out_dir / "tumor.xml", a.regions)
    title = ("SYNTHETIC - " if a.synthetic else "") + (
        f"{a.slide_path.name}: tumour probability ({cfg.architecture}), max {a.slide_score:.2f}, "
        f"{len(a.regions)} region(s) >= {a.settings.threshold:g}")
    render_overlay(a.thumbnail, a.tissue.l0_per_px, a.heatmap, tissue_polygons_l0=a.tissue.polygons(), title=title,
                   threshold=a.settings.threshold, path=out_dir / "overlay.png", uncertainty=a.uncertainty,
                   uncertainty_over=(f"{a.settings.inference.mc_dropout} MC-dropout samples"
                                     if a.settings.inference.mc_dropout else "TTA views"))
    seconds_export = time.perf_counter() - t0
    grid = a.grid
    record = RunRecord(
        status="ok",
        synthetic=a.synthetic,
        slide=a.slide_info,
        model=a.model_info(),
        settings={"run": a.settings.to_dict(), "grid": a.grid_config.to_dict(), "merge": a.merge,
                  "tissue": a.tissue_config.to_dict()},
        output_key=output_key(a.slide_path, a.package, a.settings),
        grid=GridInfo(shape_rc=list(grid.shape_rc), cell_l0=grid.cell_l0, patch_l0=grid.patch_l0,
                      offset_l0=grid.offset_l0),
        heatmap=a.heatmap.geometry(),
        counts=Counts(n_patches=len(grid), tissue_mm2=a.tissue.area_mm2(), n_regions=len(a.regions)),
        slide_score=a.slide_score,
        tumor_area_mm2=a.tumor_area_mm2,
        timings={**a.timings, "seconds_export": round(seconds_export, 4),
                 "seconds_slide": round(a.timings.get("seconds_analysis", 0.0) + seconds_export, 4)},
        versions=_versions(),
        outputs=outputs,
        runtime=a.runtime or None,
        worker=dict(worker) if worker else None,
        uncertainty=a.uncertainty_summary(),
    )
    record.write(out_dir / "run.json")  # last: marks the slide finished
    return record


# --------------------------------------------------------------------------------------------
# What decides a slide's outputs


def _model_config_sha256(package: ModelPackage) -> str:
    text = json.dumps(package.config.to_dict(), sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def slide_identity(slide_path: Path) -> dict:
    """Which slide file made the outputs: its name and size (not its folder, so moved slides
    still resume)."""
    try:
        size = slide_path.stat().st_size
    except OSError:
        size = None
    return {"name": slide_path.name, "size": size}


def output_key(slide_path: str | Path, package: ModelPackage, config: RunConfig) -> dict:
    """Everything that decides a slide's outputs, as written to ``run.json`` (``output_key``).

    A finished slide is skipped only when this matches exactly: the slide file (name and size),
    the model's weights (sha256) and ``config.json`` (sha256 of its content), the resolved grid
    (patch size, spacing, stride, tissue fraction), merge, tissue settings, threshold, the mpp
    override, reader backend, the pyramid level read (``read_from``), device, runtime, precision (and an
    int8 run's calibration: its
    ``--calibration`` path, or ``"auto"``, the package's cached graph) and graph
    optimisation, and test-time augmentation (``tta``, present only when not ``"none"``, so folders
    written before the option still resume) or MC-dropout (``mc_dropout``: samples and seed, present
    only when on). Batch size, reader workers, the conversion cache and
    progress bars do not change outputs and are not in it.
    """
    slide_path = Path(slide_path)
    grid_cfg, merge = grid_settings(package, config)
    inf = config.inference
    key = {
        "slide": slide_identity(slide_path),
        "model_sha256": package.sha256,
        "model_config_sha256": _model_config_sha256(package),
        "grid": grid_cfg.to_dict(),
        "merge": merge,
        "tissue": TissueConfig(thumb_mpp=config.thumb_mpp).to_dict(),
        "threshold": config.threshold,
        "mpp_override": config.mpp_override,
        "backend": config.backend,
        "device": inf.device,
        "runtime": inf.runtime,
        "precision": inf.precision,
        "calibration": (inf.calibration or "auto") if inf.precision == "int8" else None,
        "optimize": inf.optimize,
        "read_from": inf.read_from,
    }
    if inf.tta != "none":
        key["tta"] = inf.tta
    if inf.mc_dropout:
        key["mc_dropout"] = {"samples": inf.mc_dropout, "seed": inf.mc_dropout_seed}
    return key


def _versions() -> dict[str, Any]:
    import tifffile
    import torch

    from wsi_toolkit.version import __version__

    v = {"wsi_toolkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "tifffile": tifffile.__version__}
    try:
        import openslide

        v["openslide"] = openslide.__library_version__
        v["openslide_python"] = openslide.__version__
    except Exception:  # pragma: no cover - backend missing
        pass
    return v
