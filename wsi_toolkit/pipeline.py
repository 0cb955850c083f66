"""The batch behind ``wsi-infer``: many slides into one output folder, resumable and shared.

Per slide, :func:`wsi_toolkit.analysis.analyse_slide` computes and
:func:`wsi_toolkit.analysis.write_outputs` writes; this module decides which slides to run, where
their outputs go, and keeps ``summary.csv``. :func:`run_batch` writes, per slide, in
``OUT/<name>/`` (``<name>`` is the slide's stem made safe, see :func:`safe_dir_name`):
``heatmap.tif``, ``overlay.png``, ``tumor.geojson``, ``tumor.xml``, ``tiles.csv`` and, last,
``run.json``. Nothing is written outside ``OUT``. Every file is written under a temporary name and
renamed, and ``run.json`` marks a finished slide: an interrupted run leaves no half-written file
(temporary files of killed processes are deleted when the slide is started again).

A re-run skips a finished slide only when its ``run.json`` was made from the same slide file (name
and size), the same model (sha256 of the weights and of ``config.json``) and the same settings
that change outputs (:func:`output_key`); otherwise the slide is redone and the log says what
differed. ``overwrite=True`` redoes every slide.

Several ``wsi-infer`` processes may share one ``OUT``: each slide is locked while it runs
(``OUT/.locks/<name>.lock``, non-blocking), and a slide locked by another process is left to it
(status ``busy``). ``OUT/summary.csv`` is rebuilt from every finished ``run.json`` and recorded
failure (``failed.json``) in ``OUT``, under a lock, so the last process to finish writes a
summary of all of them. One failing slide is recorded (status ``failed`` with the error) while
the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import filelock

from wsi_toolkit.analysis import OUTPUT_FILES, RunConfig, analyse_slide, output_key, slide_identity, write_outputs
from wsi_toolkit.atomic import clean_stale_partials, write_json_atomic
from wsi_toolkit.errors import SlideNotFoundError, SlidePermissionError, WsiToolkitError
from wsi_toolkit.export import write_summary_csv
from wsi_toolkit.model_package import ModelPackage, load_model_package
from wsi_toolkit.records import RunRecord, RunRecordError, upgrade_output_key

__all__ = ["RunConfig", "SlideResult", "SlideTask", "run_slide", "run_batch", "place_slide", "run_slide_task",
           "OUTPUT_FILES", "RESERVED_NAMES", "safe_dir_name", "slide_out_dir", "output_key", "summary_rows",
           "write_summary", "record_failed", "prepare_out"]

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


def run_slide(slide_path: str | Path, package: ModelPackage, out_dir: str | Path, config: RunConfig, *,
              worker: Mapping[str, Any] | None = None) -> SlideResult:
    """Analyse one slide and write its outputs into ``out_dir`` (its own folder). Raises on failure
    (see :func:`run_batch`). ``worker``: which node and device ran it (recorded in ``run.json``)."""
    record = write_outputs(analyse_slide(slide_path, package, config), out_dir,
                           worker=dict(worker) if worker else None)
    return SlideResult.from_record(record, out_dir=str(out_dir), seconds=round(record.timings["seconds_slide"], 3))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _key_differences(old: dict, new: dict) -> list[str]:
    """``["threshold 0.5 -> 0.6", ...]``: the fields of two output keys that differ."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for k in list(b) + [k for k in a if k not in b]:
        va, vb = a.get(k, "(absent)"), b.get(k, "(absent)")
        if va != vb:
            if isinstance(va, str) and isinstance(vb, str) and len(va) == len(vb) == 64:  # sha256: short form
                va, vb = va[:12], vb[:12]
            diffs.append(f"{k} {va} -> {vb}")
    return diffs


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _finished(out_dir: Path) -> RunRecord | None:
    """The folder's ``run.json`` when the slide finished there (status ok, every output present)."""
    if not (out_dir / "run.json").is_file():
        return None
    try:
        run = RunRecord.read(out_dir / "run.json")
    except RunRecordError as exc:
        log.debug("%s", exc)
        return None
    if run.status != "ok" or not all((out_dir / f).is_file() for f in OUTPUT_FILES):
        return None
    return run


def _decide(out_dir: Path, key: dict, overwrite: bool) -> tuple[str, RunRecord | None, str]:
    """("skip", run, "") for a finished slide with the same output key; ("run", None, why) otherwise."""
    run = _finished(out_dir)
    if overwrite:  # say "redoing" only where there was something to redo
        return "run", None, "--overwrite" if run is not None else ""
    if run is None:
        return "run", None, ""
    old = upgrade_output_key(run.output_key)
    if not isinstance(old, dict):
        return "run", None, "its run.json has no output_key (made by an older wsi-toolkit)"
    diffs = _key_differences(old, key)
    if diffs:
        return "run", None, "; ".join(diffs)
    return "skip", run, ""


# --------------------------------------------------------------------------------------------
# Output folder names


_UNSAFE_CHARS = frozenset('/\\:*?"<>|')


def safe_dir_name(stem: str) -> str:
    """A slide stem as a folder name that stays inside ``OUT`` and is not one of the batch's own
    files.

    Path separators, ``: * ? " < > |`` and control characters become ``_``; leading dots and
    spaces and trailing dots and spaces are dropped (so ``..`` and ``.`` cannot name the parent
    or ``OUT`` itself, and no slide folder is hidden); an empty result becomes ``slide``; a name
    in :data:`RESERVED_NAMES` (``summary.csv``) gets ``_slide`` appended.
    """
    name = "".join("_" if (c in _UNSAFE_CHARS or unicodedata.category(c).startswith("C")) else c
                   for c in unicodedata.normalize("NFC", stem))
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        name = "slide"
    if name.casefold() in RESERVED_NAMES:
        name = f"{name}_slide"
    return name


def _owner(folder: Path) -> dict | None:
    """The slide identity recorded in a slide folder (run.json, else failed.json), if any."""
    for doc_name in ("run.json", FAILED_FILE):
        doc = _read_json(folder / doc_name)
        if doc is None:
            continue
        ident = (doc.get("output_key") or {}).get("slide")
        if isinstance(ident, dict) and ident.get("name"):
            return ident
        path = (doc.get("slide") or {}).get("path") if isinstance(doc.get("slide"), dict) else doc.get("slide")
        if isinstance(path, str) and path:
            return {"name": Path(path).name, "size": None}
    return None


def _same_slide(a: dict, b: dict) -> bool:
    return a.get("name") == b.get("name") and (a.get("size") is None or b.get("size") is None
                                               or a.get("size") == b.get("size"))


def slide_out_dir(out: Path, slide_path: Path, taken: set[str]) -> Path:
    """``OUT/<safe stem>`` (:func:`safe_dir_name`), unique in the batch and on disk.

    A second slide of this batch with the same (case-insensitive) name gets
    ``<name>_<suffix>`` (``a.tif``, ``a.svs``), then ``<name>_2``, ...; so does a slide whose
    folder already holds another slide's results (by file name and size), so one never
    overwrites another. ``taken`` (casefolded names) is updated.
    """
    out, slide_path = Path(out), Path(slide_path)
    base = safe_dir_name(slide_path.stem)
    me = slide_identity(slide_path)

    def free(name: str) -> bool:
        if name.casefold() in taken or name.casefold() in RESERVED_NAMES:
            return False
        owner = _owner(out / name)
        return owner is None or _same_slide(owner, me)

    candidates = [base]
    suffix = safe_dir_name(slide_path.suffix.lstrip("."))
    if slide_path.suffix:
        candidates.append(f"{base}_{suffix}")
    name = next((c for c in candidates if free(c)), None)
    i = 2
    while name is None:
        name = f"{base}_{i}" if free(f"{base}_{i}") else None
        i += 1
    taken.add(name.casefold())
    return out / name


# --------------------------------------------------------------------------------------------
# summary.csv


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
            run = _finished(Path(r.out_dir))
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
        run = _finished(folder)
        if run is not None:
            rows.append(SlideResult.from_record(run).row())
            continue
        failed = _read_json(folder / FAILED_FILE)
        if failed is not None:
            rows.append({"slide": str(failed.get("slide", "")), "status": "failed",
                         "error": str(failed.get("error", "")), "seconds": failed.get("seconds")})
    return rows


def write_summary(out: Path, results: list[SlideResult]) -> None:
    """Rebuild ``OUT/summary.csv`` (atomically, under ``OUT/.summary.csv.lock``)."""
    with filelock.FileLock(str(out / SUMMARY_LOCK), timeout=120):
        write_summary_csv(out / "summary.csv", summary_rows(out, results))


# --------------------------------------------------------------------------------------------
# The batch


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


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a slide file (missing, a folder, no permission), or None."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return str(SlideNotFoundError(f"{path} does not exist; check the path"))
    except IsADirectoryError:
        return str(SlideNotFoundError(f"{path} is a folder, not a slide file; pass the slide file itself"))
    except PermissionError:
        return str(SlidePermissionError(f"{path}: permission denied; make it readable (chmod +r) for this user"))
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc}); check the file and its disk"
    return None


def _run_one(path: Path, out_dir: Path, package: ModelPackage, config: RunConfig, *,
             worker: Mapping[str, Any] | None = None,
             before_run: Callable[[Path], None] | None = None) -> SlideResult:
    """Run (or skip) one slide while holding its lock."""
    t0 = time.perf_counter()
    for stale in clean_stale_partials(out_dir):
        log.info("%s: removed %s, left by a process that no longer runs", path, stale)
    decision, done, why = _decide(out_dir, output_key(path, package, config), config.overwrite)
    if decision == "skip":
        log.info("%s: skipped: finished before in %s with the same slide, model and settings "
                 "(use --overwrite to redo)", path, out_dir)
        assert done is not None
        return SlideResult.from_record(done, "skipped", out_dir=str(out_dir), seconds=0.0)
    if why:
        log.warning("%s: redoing %s: %s", path, out_dir, why)
    else:
        log.info("%s: running into %s", path, out_dir)
    # Unfinished until the new run.json: a reader never pairs new files with the old run.json.
    (out_dir / "run.json").unlink(missing_ok=True)
    if before_run is not None:
        before_run(out_dir)
    try:
        result = run_slide(path, package, out_dir, config, worker=worker)
    except WsiToolkitError as exc:
        log.error("%s", exc)
        return record_failed(path, out_dir, str(exc), t0)
    except Exception as exc:  # one slide's unexpected failure must not end the batch
        log.exception("%s: unexpected failure", path)
        return record_failed(path, out_dir, f"{path}: unexpected {type(exc).__name__}: {exc}", t0)
    (out_dir / FAILED_FILE).unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------------------------
# The per-slide step, in two halves: placing (the batch's driver) and running (whoever holds the
# model: this process, or a worker of wsi_toolkit.scale)


@dataclass(frozen=True)
class SlideTask:
    """A slide of the batch and the folder in ``OUT`` its outputs go to (:func:`place_slide`)."""

    slide: Path
    out_dir: Path


def place_slide(out: Path, path: Path, taken: set[str]) -> SlideTask | SlideResult:
    """The first half of a slide's step: a :class:`SlideTask` when ``path`` is readable and has a
    folder (:func:`slide_out_dir`; ``taken`` is updated), else its ``failed`` result (recorded
    without touching any folder: another slide may own its name)."""
    t0 = time.perf_counter()
    problem = _unreadable(path)
    if problem is not None:
        log.error("%s", problem)
        return record_failed(path, None, problem, t0)
    try:
        return SlideTask(slide=path, out_dir=slide_out_dir(out, path, taken))
    except OSError as exc:
        return record_failed(path, None, f"{path}: cannot choose an output folder ({exc})", t0)


def run_slide_task(task: SlideTask, package: ModelPackage, config: RunConfig, *,
                   worker: Mapping[str, Any] | None = None,
                   before_run: Callable[[Path], None] | None = None) -> SlideResult:
    """The second half: take the slide's lock (``OUT/.locks/<name>.lock``, non-blocking; held by
    another process: status ``busy``), then skip, redo or run it (:func:`run_batch`). A failure is
    recorded and returned, never raised. ``worker`` is recorded in ``run.json``; ``before_run`` is
    called with the folder once the lock is held and the slide is about to run."""
    path, out_dir = task.slide, task.out_dir
    lock = filelock.FileLock(str(out_dir.parent / LOCK_DIR / f"{out_dir.name}.lock"))
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        log.warning("%s: another wsi-infer process is running it into %s; left to that process", path, out_dir)
        return SlideResult(
            slide=str(path), status="busy", out_dir=str(out_dir),
            error=f"being run by another wsi-infer process (lock {lock.lock_file}); its summary.csv lists it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _run_one(path, out_dir, package, config, worker=worker, before_run=before_run)
    finally:
        lock.release()


def prepare_out(out: Path) -> None:
    """``OUT`` and its lock folder made, temporaries of killed runs (``summary.csv``) removed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_DIR).mkdir(exist_ok=True)
    clean_stale_partials(out)


def run_batch(slide_paths: list[Path], model_dir: str | Path | ModelPackage, out: str | Path,
              config: RunConfig = RunConfig(),
              *, failures: Sequence[tuple[str | Path, str]] = (), timings: dict | None = None) -> list[SlideResult]:
    """Run every slide; a failure is recorded and the batch goes on. Writes ``OUT/summary.csv``.

    A finished slide is skipped when its output key (:func:`output_key`) is unchanged, and redone
    (with a log line saying what differed) when it changed, or always with ``config.overwrite``.
    A slide another process holds the lock of is left to it (status ``busy``). ``failures``:
    (argument, error) pairs found before the batch (e.g. an unreadable folder), recorded as failed
    slides. ``model_dir``: the package's folder, or the package already loaded. ``timings``, when
    given, receives ``seconds_package_load``. The model is loaded once; an
    unloadable model raises before any slide runs. The same
    batch on a Ray cluster: :func:`wsi_toolkit.scale.run_batch_ray`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_dir, ModelPackage):
        package = model_dir
    else:
        t0 = time.perf_counter()
        package = load_model_package(model_dir)
        if timings is not None:
            timings["seconds_package_load"] = time.perf_counter() - t0
    prepare_out(out)
    results: list[SlideResult] = [
        SlideResult(slide=str(arg), status="failed", error=error) for arg, error in failures]
    for _arg, error in failures:
        log.error("%s", error)
    taken: set[str] = set()
    for path in slide_paths:
        placed = place_slide(out, Path(path), taken)
        if isinstance(placed, SlideResult):
            results.append(placed)
            continue
        result = run_slide_task(placed, package, config)
        results.append(result)
        if result.status != "busy":
            write_summary(out, results)
    write_summary(out, results)
    return results
