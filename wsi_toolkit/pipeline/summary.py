"""``OUT/summary.csv``: rebuilt from this run's results and every finished or failed slide folder."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import filelock

from wsi_toolkit.export import write_summary_csv
from wsi_toolkit.pipeline.results import FAILED_FILE, SUMMARY_LOCK, SlideResult, finished, read_json


def summary_rows(out: Path, results: list[SlideResult]) -> list[Mapping[str, Any]]:
    """The rows of ``summary.csv``: this run's slides in order (a ``busy`` slide that another
    process has finished meanwhile as ``ok``), then every other slide folder in ``OUT`` with a
    finished ``run.json`` (``ok``) or a ``failed.json`` (``failed``), by folder name."""
    out = Path(out)
    rows: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for r in results:
        if r.out_dir:
            seen.add(os.path.normcase(str(Path(r.out_dir))))
        if r.status == "busy" and r.out_dir:
            run = finished(Path(r.out_dir))
            if run is not None:
                rows.append(SlideResult.from_record(run).row())
                continue
        rows.append(r.row())
    try:
        folders = sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        folders = []
    for folder in folders:
        if os.path.normcase(str(folder)) in seen:
            continue
        run = finished(folder)
        if run is not None:
            rows.append(SlideResult.from_record(run).row())
            continue
        failed = read_json(folder / FAILED_FILE)
        if failed is not None:
            rows.append({"slide": str(failed.get("slide", "")), "status": "failed",
                         "error": str(failed.get("error", "")), "seconds": failed.get("seconds")})
    return rows


def write_summary(out: Path, results: list[SlideResult]) -> None:
    """Rebuild ``OUT/summary.csv`` (atomically, under ``OUT/.summary.csv.lock``)."""
    with filelock.FileLock(str(out / SUMMARY_LOCK), timeout=120):
        write_summary_csv(out / "summary.csv", summary_rows(out, results))
