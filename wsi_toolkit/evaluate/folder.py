"""``wsi-eval`` on folders: find the results and their annotations, score them, write the tables and plots.

:func:`evaluate_results` reads ``wsi-infer`` slide folders (``<stem>/run.json`` + ``heatmap.tif``)
and ``<stem>.csv`` detection files, and writes ``metrics.json``, ``slides.csv``, ``froc.csv``,
``froc.png``, ``roc.png`` and ``detections/<stem>.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_toolkit.atomic import write_json_atomic, write_text_atomic
from wsi_toolkit.errors import ConfigError, one_line
from wsi_toolkit.evaluate.detections import detections_from_heatmap, read_detections_csv, write_detections_csv
from wsi_toolkit.evaluate.figures import plot_froc, plot_roc
from wsi_toolkit.evaluate.mask import DILATION_UM, EVAL_LEVEL, ITC_MAJOR_AXIS_UM
from wsi_toolkit.evaluate.scoring import (
    SLIDE_SCORES,
    TARGET_FPS,
    FrocResult,
    SlideMatch,
    froc_curve,
    match_detections,
    slide_auc,
)
from wsi_toolkit.evaluate.truth import ANNOTATION_PATTERNS, find_annotation, slide_truth
from wsi_toolkit.export import csv_text
from wsi_toolkit.limits import MPP_RANGE_UM, check_int, check_number, in_range, range_text
from wsi_toolkit.records import RunRecord

__all__ = ["EvalConfig", "SlideEval", "SLIDE_COLUMNS", "EvalReport", "evaluate_results", "format_summary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``wsi-eval`` (written to ``metrics.json``).

    Attributes
    ----------
    nms_radius_um : float
        Detection NMS radius (um), see :func:`detections_from_heatmap`.
    min_prob : float
        Lowest detection probability kept from heatmaps, in (0, 1].
    slide_score : str
        Key of :data:`SLIDE_SCORES`, applied to the heatmap (or, for CSV input, the detections).
    level : int
        Evaluation level (5: one pixel = 32 level-0 px).
    mask_value : int or None
        Tumour value in mask TIFFs (None = any non-zero; the CAMELYON16 data-release masks use 2).
    mpp : float or None
        Level-0 um/px of slides given only as detection CSVs (heatmap results carry theirs in
        ``run.json``); None = the mask TIFF's resolution tags, else 0.243 (the challenge's constant).
    """

    nms_radius_um: float = 150.0
    min_prob: float = 0.1
    slide_score: str = "max"
    level: int = EVAL_LEVEL
    mask_value: int | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        check_number(self.nms_radius_um, "nms_radius_um", bounds=(0.0, math.inf), unit="um")
        if not (isinstance(self.min_prob, (int, float)) and 0 < self.min_prob <= 1):
            raise ConfigError(f"min_prob must be in (0, 1]; got {self.min_prob!r}")
        if self.slide_score not in SLIDE_SCORES:
            raise ConfigError(f"slide_score must be one of {sorted(SLIDE_SCORES)}; got {self.slide_score!r}")
        check_int(self.level, "level", minimum=0, bounds=(0, 12))
        if self.mask_value is not None:
            check_int(self.mask_value, "mask_value (None = any non-zero)")
        if self.mpp is not None and not in_range(self.mpp, MPP_RANGE_UM):
            raise ConfigError(f"mpp (--mpp) must be the slides' level-0 micrometres per pixel in "
                              f"{range_text(MPP_RANGE_UM, 'um/px')} (Camelyon16: 0.243 or 0.226); got {self.mpp!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlideEval:
    """One row of ``slides.csv``."""

    slide: str
    source: Literal["heatmap", "csv"]
    truth: Literal["tumor", "normal"]
    score: float
    n_detections: int
    n_fp: int
    n_lesions: int
    lesions_found: int
    lesions_missed: int
    n_itc: int
    itc_hits: int
    l0_mpp: float
    annotation: str = ""

    def row(self) -> dict:
        return asdict(self)


SLIDE_COLUMNS = tuple(SlideEval.__dataclass_fields__)


@dataclass(frozen=True, eq=False)
class EvalReport:
    """What :func:`evaluate_results` computed and wrote."""

    froc: FrocResult
    slide_auc: float
    slides: tuple[SlideEval, ...]
    metrics: dict
    files: dict[str, Path]


@dataclass
class _Source:
    stem: str
    kind: Literal["heatmap", "csv"]
    path: Path
    run: dict[str, Any] = field(default_factory=dict)  # _read_run's fields, for a heatmap folder


def _read_run(path: Path) -> dict:
    """What ``wsi-eval`` uses of a ``wsi-infer`` ``run.json`` (a :class:`~wsi_toolkit.records.RunRecord`):
    ``status``, ``finished`` (status ok) and, for a finished run, the heatmap geometry and the slide's
    size, um/px and path.

    Raises OSError / ValueError when the file cannot be read or is not a run record.
    """
    doc = json.loads(path.read_text(encoding="utf-8"))
    status = doc.get("status") if isinstance(doc, dict) else None
    if status != "ok":
        return {"status": status, "finished": False}
    run = RunRecord.from_dict(doc, source=path)  # RunRecordError is a ValueError
    geo, slide = run.heatmap, run.slide
    return {
        "status": status,
        "finished": True,
        "cell_l0": float(geo["cell_l0"]),
        "l0_mpp": float(geo.get("l0_mpp") or slide.mpp),
        "origin_l0": tuple(geo.get("origin_l0", (0, 0))),
        "shape_rc": geo.get("shape_rc"),
        "l0_size": tuple(int(v) for v in slide.level0_size),
        "slide_path": Path(slide.path) if slide.path else None,
        "synthetic": run.synthetic,
    }


def _find_sources(results: Path) -> list[_Source]:
    """wsi-infer slide folders (finished: run.json ok + heatmap.tif) and top-level ``<stem>.csv`` files."""
    if not results.is_dir():
        raise ConfigError(f"--results {results} is not a folder; pass the wsi-infer output folder or a folder of "
                          "<slide>.csv detection files")
    found: dict[str, _Source] = {}
    for d in sorted(p for p in results.iterdir() if p.is_dir()):
        run_json, heat = d / "run.json", d / "heatmap.tif"
        if not run_json.is_file():
            if heat.is_file():
                log.warning("%s: no run.json (unfinished wsi-infer run?); skipped", d)
            continue
        try:
            run = _read_run(run_json)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable run.json (%s); skipped", d, exc)
            continue
        if not run["finished"] or not heat.is_file():
            log.warning("%s: not a finished wsi-infer slide (status %r); skipped", d, run["status"])
            continue
        found[d.name] = _Source(d.name, "heatmap", d, run)
    for f in sorted(p for p in results.iterdir() if p.is_file() and p.suffix.lower() == ".csv"):
        if f.name == "summary.csv":  # wsi-infer's batch table
            continue
        if f.stem in found:
            log.warning("%s: slide %s also has a heatmap folder; the heatmap is evaluated", f, f.stem)
            continue
        found[f.stem] = _Source(f.stem, "csv", f)
    return [found[k] for k in sorted(found)]


def _read_heatmap(src: _Source) -> np.ndarray:
    import tifffile

    shape_rc = src.run["shape_rc"]
    path = src.path / "heatmap.tif"
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.pages[0].asarray()
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ConfigError(
            f"{path}: cannot read the heatmap ({one_line(exc)}); re-run wsi-infer with --overwrite") from None
    if data.ndim == 3:
        data = data[..., 0]
    if shape_rc is not None and list(data.shape) != list(shape_rc):
        raise ConfigError(f"{path}: heatmap is {data.shape[0]}x{data.shape[1]} cells but run.json says "
                          f"{shape_rc}; re-run wsi-infer with --overwrite")
    return data.astype(np.float64) / 255.0


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not math.isfinite(v) else f"{float(v):.6g}"
        return csv_text(v) if isinstance(v, str) else str(v)  # slide names: no spreadsheet formulas

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(v) for v in row])
    write_text_atomic(path, buf.getvalue())


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def evaluate_results(results: str | os.PathLike[str], annotations: str | os.PathLike[str],
                     out: str | os.PathLike[str] | None = None, config: EvalConfig = EvalConfig()) -> EvalReport:
    """Evaluate ``wsi-infer`` results (or Camelyon16 detection CSVs) against annotations.

    Parameters
    ----------
    results : path
        A ``wsi-infer`` output folder (``<stem>/heatmap.tif`` + ``run.json`` per finished slide)
        and/or a folder of ``<stem>.csv`` detection files (``prob,x,y``, level-0 px).
    annotations : path
        Ground truth by slide stem: ``<stem>.xml`` (ASAP; tumour groups ``_0``, ``_1``, ``Tumor``
        minus ``_2``/``Exclusion``), ``<stem>.geojson``, or a mask TIFF ``<stem>_mask.tif`` /
        single-channel ``<stem>.tif``. A slide without one (or without tumour in it) is normal.
    out : path or None
        Output folder (default ``RESULTS/eval``). Written (each atomically): ``metrics.json``,
        ``slides.csv``, ``froc.csv``, ``froc.png``, ``roc.png``, ``detections/<stem>.csv``.

    Raises
    ------
    ConfigError
        No results found, unreadable heatmap, bad settings.
    AnnotationError, DetectionFileError
        Malformed ground truth or detection file.
    """
    results, annotations = Path(results), Path(annotations)
    out = Path(out) if out is not None else results / "eval"
    if not annotations.is_dir():
        raise ConfigError(f"--annotations {annotations} is not a folder; pass the folder of <slide>.xml files")
    sources = _find_sources(results)
    if not sources:
        raise ConfigError(f"no results in {results}: expected wsi-infer slide folders (<stem>/run.json + heatmap.tif) "
                          "or <stem>.csv detection files")
    index = {p.name.casefold(): p for p in sorted(annotations.iterdir()) if p.is_file()}
    (out / "detections").mkdir(parents=True, exist_ok=True)
    score_fn = SLIDE_SCORES[config.slide_score]
    rows: list[SlideEval] = []
    matches: list[SlideMatch] = []
    used_annotations: set[Path] = set()
    synthetic = False
    for src in sources:
        if src.kind == "heatmap":
            run = src.run
            prob = _read_heatmap(src)
            l0_mpp = run["l0_mpp"]
            detections = detections_from_heatmap(prob, run["cell_l0"], l0_mpp=l0_mpp,
                                                 nms_radius_um=config.nms_radius_um, min_prob=config.min_prob,
                                                 origin_l0=run["origin_l0"])
            score = score_fn(prob)
            l0_size, slide_path = run["l0_size"], run["slide_path"]
            synthetic = synthetic or run["synthetic"]
        else:
            detections = read_detections_csv(src.path)
            score = score_fn(detections[:, 0])
            l0_mpp, l0_size, slide_path = None, None, None
        ann = find_annotation(index, src.stem, slide_path)
        if ann is not None:
            used_annotations.add(ann)
        is_tumor, mask, l0_mpp = slide_truth(ann, l0_size=l0_size, l0_mpp=l0_mpp, level=config.level,
                                             mpp=config.mpp, mask_value=config.mask_value)
        match = match_detections(detections, mask)
        matches.append(match)
        write_detections_csv(out / "detections" / f"{src.stem}.csv", detections)
        rows.append(SlideEval(slide=src.stem, source=src.kind, truth="tumor" if is_tumor else "normal",
                              score=float(score), n_detections=match.n_detections, n_fp=match.n_fp,
                              n_lesions=match.n_lesions, lesions_found=match.n_found, lesions_missed=match.n_missed,
                              n_itc=match.n_itc, itc_hits=match.n_itc_hits, l0_mpp=float(l0_mpp),
                              annotation=ann.name if ann else ""))
        log.info("%s: %s, %d detections, %d/%d lesions found, %d FP", src.stem, rows[-1].truth, match.n_detections,
                 match.n_found, match.n_lesions, match.n_fp)
    stems = {s.stem.casefold() for s in sources}
    unmatched = sorted(p.name for p in index.values()
                       if p not in used_annotations and p.suffix.lower() in (".xml", ".geojson", ".tif", ".tiff")
                       and not any(p.name.casefold() == pat.format(s) for s in stems for pat in ANNOTATION_PATTERNS))
    if unmatched:
        log.warning("annotations without results (not evaluated): %s", ", ".join(unmatched))

    result = froc_curve(matches)
    scores = [r.score for r in rows]
    truths = [r.truth == "tumor" for r in rows]
    auc = slide_auc(scores, truths)
    prefix = "SYNTHETIC - " if synthetic else ""
    files = {
        "metrics": out / "metrics.json",
        "slides": out / "slides.csv",
        "froc_curve": out / "froc.csv",
        "froc_plot": out / "froc.png",
        "roc_plot": out / "roc.png",
        "detections": out / "detections",
    }
    _write_csv(files["slides"], SLIDE_COLUMNS, ([getattr(r, c) for c in SLIDE_COLUMNS] for r in rows))
    _write_csv(files["froc_curve"], ("threshold", "avg_fps", "sensitivity"),
               zip([*result.thresholds.tolist(), ""], result.avg_fps.tolist(), result.sensitivity.tolist()))
    plot_froc(result, files["froc_plot"], title=f"{prefix}FROC {result.score:.3f}: {result.n_slides} slides, "
                                                f"{result.n_lesions} lesions")
    plot_roc(scores, truths, files["roc_plot"], title=f"{prefix}slide-level ROC (score: {config.slide_score})")
    n_tumor = sum(truths)
    metrics = {
        "froc": _finite_or_none(result.score),
        "sensitivities": {f"{t:g}": _finite_or_none(s) for t, s in zip(result.targets, result.sensitivities)},
        "slide_auc": _finite_or_none(auc),
        "n_slides": len(rows),
        "n_tumor_slides": n_tumor,
        "n_normal_slides": len(rows) - n_tumor,
        "n_lesions": result.n_lesions,
        "n_lesions_found": result.n_found,
        "n_itc_excluded": result.n_itc,
        "n_detections": result.n_detections,
        "n_false_positives": result.n_fp,
        "slide_score": config.slide_score,
        "synthetic": synthetic,
        "settings": config.to_dict(),
        "rules": {
            "evaluation_level": config.level,
            "dilation_um": DILATION_UM / 2,
            "itc_major_axis_um": ITC_MAJOR_AXIS_UM,
            "target_fps": list(TARGET_FPS),
            "l0_mpp": "the slide's own (run.json; --mpp or mask tags or 0.243 for detection CSVs)",
            "score_pick": "first curve point with avg FPs >= target, else the last (CAMELYON16 data-release rule)",
        },
        "annotations_without_results": unmatched,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json_atomic(files["metrics"], metrics)
    return EvalReport(froc=result, slide_auc=auc, slides=tuple(rows), metrics=metrics, files=files)


def format_summary(report: EvalReport) -> str:
    """A few human-readable lines about an :class:`EvalReport`."""
    m, r = report.metrics, report.froc

    def f(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"

    sens = " ".join(f"{lbl}:{f(s)}" for lbl, s in zip(("1/4", "1/2", "1", "2", "4", "8"), r.sensitivities))
    lines = [
        f"{'SYNTHETIC - ' if m['synthetic'] else ''}{m['n_slides']} slides ({m['n_tumor_slides']} tumour, "
        f"{m['n_normal_slides']} normal); {m['n_lesions']} lesions ({m['n_itc_excluded']} ITC excluded); "
        f"{m['n_detections']} detections",
        f"FROC {f(r.score)}  (sensitivity at FP/slide {sens}); lesions found {r.n_found}/{r.n_lesions}, "
        f"false positives {r.n_fp}",
        f"slide AUC {f(report.slide_auc)}  (slide score: {m['slide_score']})",
        f"wrote {report.files['metrics'].parent}: metrics.json, slides.csv, froc.csv, froc.png, roc.png, detections/",
    ]
    if m["annotations_without_results"]:
        lines.append(f"warning: annotations without results: {', '.join(m['annotations_without_results'])}")
    return "\n".join(lines)
