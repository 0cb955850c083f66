"""The batch itself: per slide, place it (:func:`place_slide`), take its lock, skip, redo or run it
(:func:`run_slide_task`); :func:`run_batch` does every slide and keeps ``summary.csv``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from wsi_toolkit.analysis import RunConfig, analyse_slide, output_key, write_outputs
from wsi_toolkit.atomic import clean_stale_partials
from wsi_toolkit.errors import SlideNotFoundError, SlidePermissionError, WsiToolkitError
from wsi_toolkit.model_package import ModelPackage, load_model_package
from wsi_toolkit.pipeline.folders import slide_out_dir
from wsi_toolkit.pipeline.results import FAILED_FILE, LOCK_DIR, SlideResult, record_failed
from wsi_toolkit.pipeline.resume import decide
from wsi_toolkit.pipeline.summary import write_summary

log = logging.getLogger(__name__)


def run_slide(slide_path: str | Path, package: ModelPackage, out_dir: str | Path, config: RunConfig, *,
              worker: Mapping[str, Any] | None = None) -> SlideResult:
    """Analyse one slide and write its outputs into ``out_dir`` (its own folder). Raises on failure
    (see :func:`run_batch`). ``worker``: which node and device ran it (recorded in ``run.json``)."""
    record = write_outputs(analyse_slide(slide_path, package, config), out_dir,
                           worker=dict(worker) if worker else None)
    return SlideResult.from_record(record, out_dir=str(out_dir), seconds=round(record.timings["seconds_slide"], 3))


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
    decision, done, why = decide(out_dir, output_key(path, package, config), config.overwrite)
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


@dataclass(frozen=True)
class Int8Graph:
    """The package's automatically calibrated INT8 graph as :func:`prepare_int8` found or made it.

    ``calibration``: ``"drawn"`` (calibrated now, on ``source``) or ``"cached"`` (made by an earlier
    batch, calibrated then on ``source``); ``cache_entry``: its folder in the runtime cache."""

    calibration: str
    source: str | None
    cache_entry: str
    seconds_calibration: float = 0.0
    seconds_quantize: float = 0.0

    def describe(self) -> str:
        if self.calibration == "drawn":
            return (f"int8: calibrated now on {self.source} ({self.seconds_calibration:.1f} s to draw, "
                    f"{self.seconds_quantize:.1f} s to quantize); cached for later runs: {self.cache_entry}")
        return (f"int8: quantized graph from the cache, calibrated once on {self.source}; nothing calibrated now "
                f"(--calibration DIR calibrates on other patches): {self.cache_entry}")


def prepare_int8(slide_paths: Sequence[str | Path], package: ModelPackage, config: RunConfig) -> Int8Graph | None:
    """The batch's INT8 calibration policy, one for every entry point (``wsi-infer``, :func:`run_batch`,
    :func:`wsi_toolkit.scale.run_batch_ray`): with ``precision="int8"`` and no ``calibration`` given,
    the package's graph is quantized once, before any slide runs, calibrated on tissue of the batch's
    slides (up to 8 of them, spread over the list), and cached; every slide of this batch, and of later
    batches on any slides, then runs that graph (cache key ``"auto"``). A lone slide
    (:func:`~wsi_toolkit.analysis.analyse_slide`) is a batch of one. Returns None when there is
    nothing to prepare (another precision, a given calibration, no slides) or when the conversion
    fails (logged; each slide then falls back to torch fp32 and records why)."""
    inf = config.inference
    if inf.precision != "int8" or inf.calibration is not None or not slide_paths:
        return None
    from wsi_toolkit.errors import ConfigError
    from wsi_toolkit.runtime import ConversionError, calibration_from_slides, openvino_available
    from wsi_toolkit.runtime.openvino import prepare_openvino_graph

    if not openvino_available():
        raise ConfigError("precision int8 needs OpenVINO: pip install 'wsi-toolkit[openvino]'")

    def draw():
        return calibration_from_slides(list(slide_paths), package, mpp=config.mpp_override, backend=config.backend,
                                       read_from=inf.read_from, min_tissue_fraction=config.min_tissue_fraction,
                                       thumb_mpp=config.thumb_mpp)

    try:
        _, info, stats = prepare_openvino_graph(package, precision="int8", cache_dir=inf.cache_dir, calibration=draw)
    except ConversionError as exc:
        log.warning("int8: %s", exc)
        return None
    return Int8Graph(calibration=str(stats["calibration"]), source=info.get("calibration", {}).get("source"),
                     cache_entry=str(stats["cache_entry"]),
                     seconds_calibration=float(stats.get("seconds_calibration", 0.0)),
                     seconds_quantize=float(stats.get("seconds_quantize", 0.0)))


def run_batch(slide_paths: list[Path], model_dir: str | Path | ModelPackage, out: str | Path,
              config: RunConfig = RunConfig(),
              *, failures: Sequence[tuple[str | Path, str]] = (), timings: dict | None = None,
              on_int8: Callable[[Int8Graph], None] | None = None) -> list[SlideResult]:
    """Run every slide; a failure is recorded and the batch goes on. Writes ``OUT/summary.csv``.

    A finished slide is skipped when its output key (:func:`output_key`) is unchanged, and redone
    (with a log line saying what differed) when it changed, or always with ``config.overwrite``.
    A slide another process holds the lock of is left to it (status ``busy``). ``failures``:
    (argument, error) pairs found before the batch (e.g. an unreadable folder), recorded as failed
    slides. ``model_dir``: the package's folder, or the package already loaded. ``timings``, when
    given, receives ``seconds_package_load`` and ``seconds_int8_prepare``. The model is loaded once; an
    unloadable model raises before any slide runs. INT8 without a given calibration is calibrated
    once for the whole batch (:func:`prepare_int8`); ``on_int8`` receives what was found or made
    (default: logged). The same batch on a Ray cluster: :func:`wsi_toolkit.scale.run_batch_ray`.
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
    t0 = time.perf_counter()
    int8 = prepare_int8(slide_paths, package, config)
    if int8 is not None:
        if timings is not None:
            timings["seconds_int8_prepare"] = time.perf_counter() - t0
        (on_int8 or (lambda g: log.info("%s", g.describe())))(int8)
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
