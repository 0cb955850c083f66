"""What a slide's folder in ``OUT`` says about it: :class:`SlideResult` (a row of ``summary.csv``),
the finished ``run.json`` (:func:`finished`) and the recorded failure (:func:`record_failed`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from wsi_toolkit.analysis import OUTPUT_FILES
from wsi_toolkit.atomic import write_json_atomic
from wsi_toolkit.records import RunRecord, RunRecordError

log = logging.getLogger(__name__)

#: Written in a slide's folder instead of ``run.json`` when the slide failed.
FAILED_FILE = "failed.json"
#: Names in ``OUT`` that the batch writes itself: never a slide's folder (compared case-insensitively).
RESERVED_NAMES = frozenset({"summary.csv"})
#: Folder in ``OUT`` holding the per-slide lock files (hidden: no slide folder starts with a dot).
LOCK_DIR = ".locks"
SUMMARY_LOCK = ".summary.csv.lock"


@dataclass
class SlideResult:
    """One row of ``summary.csv``."""

    slide: str
    status: Literal["ok", "failed", "skipped", "busy"]
    error: str = ""
    slide_score: float | None = None
    tumor_area_mm2: float | None = None
    n_patches: int | None = None
    seconds: float | None = None
    out_dir: str = ""

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "out_dir"}

    @classmethod
    def from_record(cls, record: RunRecord, status: Literal["ok", "skipped"] = "ok", *, out_dir: str = "",
                    seconds: float | None = None) -> SlideResult:
        return cls(slide=record.slide.path, status=status, slide_score=record.slide_score,
                   tumor_area_mm2=record.tumor_area_mm2, n_patches=record.counts.n_patches,
                   seconds=record.timings.get("seconds_slide") if seconds is None else seconds, out_dir=out_dir)


def read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def finished(out_dir: Path) -> RunRecord | None:
    """The folder's ``run.json`` when the slide finished there (status ok, every output present)."""
    if not (out_dir / "run.json").is_file():
        return None
    try:
        run = RunRecord.read(out_dir / "run.json")
    except RunRecordError as exc:
        log.debug("%s", exc)
        return None
    if run.status != "ok" or not all((out_dir / f).is_file() for f in {*OUTPUT_FILES, *run.outputs}):
        return None
    return run


def record_failed(path: Path, out_dir: Path | None, error: str, t0: float) -> SlideResult:
    """A ``failed`` result for ``path`` (``t0``: when it started); with ``out_dir``, also written
    there as ``failed.json`` (summary.csv lists it)."""
    seconds = round(time.perf_counter() - t0, 3)
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_dir / FAILED_FILE, {"status": "failed", "slide": str(path), "error": error,
                                                      "seconds": seconds})
        except OSError as exc:  # recording the failure must not end the batch
            log.warning("%s: could not write %s (%s)", path, out_dir / FAILED_FILE, exc)
    return SlideResult(slide=str(path), status="failed", error=error, seconds=seconds,
                       out_dir=str(out_dir) if out_dir is not None else "")
