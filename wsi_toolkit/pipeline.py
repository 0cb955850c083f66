"""Slide-level inference end to end: tissue -> grid -> batched predictions -> heatmap -> exports.

:func:`run_batch` is the library call behind ``wsi-infer``. Per slide it writes, in
``OUT/<slide-stem>/``: ``heatmap.tif``, ``overlay.png``, ``tumor.geojson``, ``tumor.xml``,
``tiles.csv`` and, last, ``run.json``. Every file is written under a temporary name and renamed,
and ``run.json`` marks a finished slide: an interrupted run leaves no half-written file, and a
re-run redoes exactly the slides without ``run.json`` (all of them with ``overwrite=True``).
One failing slide is recorded (``OUT/summary.csv``, status ``failed`` with the error) while the
others go on.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.export import (
    render_overlay,
    tumour_regions,
    write_heatmap_tiff,
    write_json_atomic,
    write_regions_asap,
    write_regions_geojson,
    write_summary_csv,
    write_tiles_csv,
)
from wsi_toolkit.heatmap import stitch
from wsi_toolkit.inference import InferenceConfig, run_inference
from wsi_toolkit.model_package import ModelPackage, load_model_package
from wsi_toolkit.slide import open_slide
from wsi_toolkit.tiling import GridConfig, make_grid
from wsi_toolkit.tissue import TissueConfig, detect_tissue

__all__ = ["RunConfig", "SlideResult", "run_slide", "run_batch", "OUTPUT_FILES"]

log = logging.getLogger(__name__)

OUTPUT_FILES = ("heatmap.tif", "overlay.png", "tumor.geojson", "tumor.xml", "tiles.csv", "run.json")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a ``wsi-infer`` run (written to each ``run.json``).

    ``stride_px=None`` and ``merge=None`` follow the model's label semantics: a centre-label model
    (PCam) gets stride ``patch_px // 3`` and the centre merge, others stride ``patch_px`` and the
    mean merge.
    """

    mpp: float | None = None
    stride_px: int | None = None
    merge: Literal["centre", "mean"] | None = None
    threshold: float = 0.5
    min_tissue_fraction: float = 0.5
    thumb_mpp: float = 8.0
    overwrite: bool = False
    backend: str = "auto"
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be in [0, 1]; got {self.threshold!r}")
        if self.merge not in (None, "centre", "mean"):
            raise ConfigError(f"merge must be 'centre' or 'mean'; got {self.merge!r}")
        if self.stride_px is not None and not (isinstance(self.stride_px, int) and self.stride_px > 0):
            raise ConfigError(f"stride_px must be a positive integer; got {self.stride_px!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlideResult:
    """One row of ``summary.csv``."""

    slide: str
    status: Literal["ok", "failed", "skipped"]
    error: str = ""
    slide_score: float | None = None
    tumor_area_mm2: float | None = None
    n_patches: int | None = None
    seconds: float | None = None
    out_dir: str = ""

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "out_dir"}


def _versions() -> dict:
    import tifffile
    import torch

    import wsi_toolkit

    v = {"wsi_toolkit": wsi_toolkit.__version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "tifffile": tifffile.__version__}
    try:
        import openslide

        v["openslide"] = openslide.__library_version__
        v["openslide_python"] = openslide.__version__
    except Exception:  # pragma: no cover - backend missing
        pass
    return v


def _grid_config(package: ModelPackage, config: RunConfig) -> tuple[GridConfig, str]:
    cfg = package.config
    centre = cfg.label_semantics == "centre"
    stride = config.stride_px or (max(1, cfg.patch_size_pixels // 3) if centre else cfg.patch_size_pixels)
    merge = config.merge or ("centre" if centre else "mean")
    grid = GridConfig(patch_px=cfg.patch_size_pixels, spacing_um_px=cfg.spacing_um_px, stride_px=stride,
                      min_tissue_fraction=config.min_tissue_fraction)
    return grid, merge


def run_slide(slide_path: str | Path, package: ModelPackage, out_dir: str | Path, config: RunConfig) -> SlideResult:
    """Run one slide into ``out_dir`` (its own folder). Raises on failure (see :func:`run_batch`)."""
    t0 = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    grid_cfg, merge = _grid_config(package, config)
    tissue_cfg = TissueConfig(thumb_mpp=config.thumb_mpp)
    with open_slide(slide_path, mpp=config.mpp, backend=config.backend) as slide:
        slide_info = {
            "path": str(slide_path), "backend": slide.backend, "vendor": slide.vendor, "mpp": slide.mpp,
            "mpp_source": slide.mpp_source, "mpp_metadata": slide.mpp_metadata, "level0_size": list(slide.dimensions),
            "level_count": slide.level_count,
            "synthetic": slide.is_synthetic,
        }
        t = time.perf_counter()
        thumb = slide.thumbnail(mpp=tissue_cfg.thumb_mpp)
        tissue = detect_tissue(thumb, l0_mpp=slide.mpp, config=tissue_cfg)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=grid_cfg, tissue_mask=tissue.mask,
                         mask_l0_per_px=tissue.l0_per_px)
        seconds_tissue = time.perf_counter() - t
        l0_mpp = slide.mpp
    result = run_inference(slide_path, grid, package, config=config.inference, mpp=config.mpp,
                           backend=config.backend, desc=slide_path.name)
    tumour_idx = package.config.tumour_index()
    p_tumour = result.probs[:, tumour_idx] if result.probs.shape[1] > 1 else result.probs[:, 0]
    heatmap = stitch(grid, p_tumour, merge=merge)
    regions = tumour_regions(heatmap, threshold=config.threshold)
    slide_score = float(p_tumour.max()) if len(p_tumour) else 0.0
    tumor_area = float(sum(r.area_mm2 for r in regions))

    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    class_names = list(package.config.class_names)
    if result.probs.shape[1] == 1:
        probs_by_class = {class_names[tumour_idx]: result.probs[:, 0]}
    else:
        probs_by_class = {name: result.probs[:, i] for i, name in enumerate(class_names)}
    write_tiles_csv(out_dir / "tiles.csv", grid, probs_by_class)
    write_heatmap_tiff(out_dir / "heatmap.tif", heatmap)
    write_regions_geojson(out_dir / "tumor.geojson", regions, slide_name=slide_path.name)
    write_regions_asap(out_dir / "tumor.xml", regions)
    synthetic = slide_info["synthetic"] or bool(package.config.extra.get("synthetic"))
    title = ("SYNTHETIC - " if synthetic else "") + (
        f"{slide_path.name}: tumour probability ({package.config.architecture}), max {slide_score:.2f}, "
        f"{len(regions)} region(s) >= {config.threshold:g}")
    render_overlay(thumb, tissue.l0_per_px, heatmap, tissue_polygons_l0=tissue.polygons(), title=title,
                   threshold=config.threshold, path=out_dir / "overlay.png")
    seconds_export = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    run = {
        "status": "ok",
        "synthetic": synthetic,
        "slide": slide_info,
        "model": {"path": str(package.path), "sha256": package.sha256, "architecture": package.config.architecture,
                  "class_names": class_names, "tumour_class": class_names[tumour_idx],
                  "patch_size_pixels": package.config.patch_size_pixels,
                  "spacing_um_px": package.config.spacing_um_px, "label_semantics": package.config.label_semantics,
                  "synthetic": bool(package.config.extra.get("synthetic"))},
        "settings": {"run": config.to_dict(), "grid": grid_cfg.to_dict(), "merge": merge, "tissue": tissue_cfg.to_dict()},
        "grid": {"shape_rc": list(grid.shape_rc), "cell_l0": grid.cell_l0, "patch_l0": grid.patch_l0,
                 "offset_l0": grid.offset_l0},
        "heatmap": heatmap.geometry(),
        "counts": {"n_patches": len(grid), "tissue_mm2": tissue.area_mm2(), "n_regions": len(regions)},
        "slide_score": slide_score,
        "tumor_area_mm2": tumor_area,
        "timings": {**result.timings(), "seconds_tissue": round(seconds_tissue, 4),
                    "seconds_export": round(seconds_export, 4), "seconds_slide": round(seconds, 4)},
        "versions": _versions(),
        "outputs": list(OUTPUT_FILES),
    }
    write_json_atomic(out_dir / "run.json", run)  # last: marks the slide finished
    return SlideResult(slide=str(slide_path), status="ok", slide_score=slide_score, tumor_area_mm2=tumor_area,
                       n_patches=len(grid), seconds=round(seconds, 3), out_dir=str(out_dir))


def _finished(out_dir: Path) -> dict | None:
    run_json = out_dir / "run.json"
    if not run_json.is_file():
        return None
    try:
        run = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return None
    if run.get("status") != "ok" or not all((out_dir / f).is_file() for f in OUTPUT_FILES):
        return None
    return run


def slide_out_dir(out: Path, slide_path: Path, taken: set[str]) -> Path:
    """``OUT/<stem>``; a second slide with the same stem gets ``<stem>_<suffix>`` (``a.tif``, ``a.svs``)."""
    name = slide_path.stem
    if name in taken:
        name = f"{slide_path.stem}_{slide_path.suffix.lstrip('.')}"
    i = 2
    while name in taken:
        name, i = f"{slide_path.stem}_{i}", i + 1
    taken.add(name)
    return out / name


def run_batch(slide_paths: list[Path], model_dir: str | Path, out: str | Path, config: RunConfig = RunConfig(),
              ) -> list[SlideResult]:
    """Run every slide; a failure is recorded and the batch goes on. Writes ``OUT/summary.csv``.

    Finished slides (a complete ``run.json``) are skipped unless ``config.overwrite``.
    The model is loaded once; an unloadable model raises before any slide runs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    package = load_model_package(model_dir)
    results: list[SlideResult] = []
    taken: set[str] = set()
    for path in slide_paths:
        path = Path(path)
        out_dir = slide_out_dir(out, path, taken)
        t0 = time.perf_counter()
        done = None if config.overwrite else _finished(out_dir)
        if done is not None:
            log.info("%s: finished before, skipped (use --overwrite to redo)", path)
            results.append(SlideResult(slide=str(path), status="skipped", slide_score=done.get("slide_score"),
                                       tumor_area_mm2=done.get("tumor_area_mm2"),
                                       n_patches=done.get("counts", {}).get("n_patches"), seconds=0.0,
                                       out_dir=str(out_dir)))
            continue
        try:
            results.append(run_slide(path, package, out_dir, config))
        except WsiToolkitError as exc:
            log.error("%s", exc)
            results.append(SlideResult(slide=str(path), status="failed", error=str(exc),
                                       seconds=round(time.perf_counter() - t0, 3), out_dir=str(out_dir)))
        except Exception as exc:  # one slide's unexpected failure must not end the batch
            log.exception("%s: unexpected failure", path)
            results.append(SlideResult(slide=str(path), status="failed",
                                       error=f"{path}: unexpected {type(exc).__name__}: {exc}",
                                       seconds=round(time.perf_counter() - t0, 3), out_dir=str(out_dir)))
        write_summary_csv(out / "summary.csv", [r.row() for r in results])
    write_summary_csv(out / "summary.csv", [r.row() for r in results])
    return results
