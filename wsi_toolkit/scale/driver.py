"""The batch of :func:`wsi_toolkit.pipeline.run_batch` on a Ray cluster: slides are the unit of work.

The driver (the ``wsi-infer --ray`` process) places every slide (readable? which folder in
``OUT``?) exactly as the single-process batch does, starts the workers
(:class:`~wsi_toolkit.scale.worker.SlideWorker`, one per GPU or per ``cpus_per_worker`` CPUs),
checks that each of them sees ``OUT`` (a probe file written by the driver and read back by every
worker, and one written by every worker and read back by the driver; a node that cannot see it
stops the batch before any slide runs), then hands the slides out from one queue: an idle worker
gets the next one. Each worker runs the same per-slide step as one process, so finished slides are
skipped, failures are recorded in the slide's folder, ``summary.csv`` is rebuilt as slides finish
(:data:`SUMMARY_EVERY_S`) and at the end, and the outputs are the same bytes.

A worker that dies mid-slide (killed, out of memory, its node lost) costs that slide's partial
work only: its temporary files are removed when the slide starts again, the slide goes back to the
queue for another worker, and a new worker replaces the dead one. A slide whose worker died
``max_attempts`` times is recorded as failed with the reason.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.pipeline import (
    Int8Graph,
    RunConfig,
    SlideResult,
    SlideTask,
    place_slide,
    prepare_int8,
    prepare_out,
    record_failed,
    write_summary,
)
from wsi_toolkit.scale.pool import EventHook, Item, Pool, Slot, plan_workers, short_error
from wsi_toolkit.scale.progress import ClusterProgress
from wsi_toolkit.scale.settings import OutNotSharedError, RaySettings, connect, ray_module
from wsi_toolkit.scale.worker import PROBE_DRIVER_FILE

__all__ = ["RaySettings", "run_batch_ray", "connect", "OutNotSharedError"]

log = logging.getLogger(__name__)

#: ``summary.csv`` is rebuilt (a scan of every slide folder in ``OUT``) at most this often while
#: slides finish, and once at the end: with many workers on a network filesystem, rebuilding it
#: after every slide would keep the driver from handing out slides.
SUMMARY_EVERY_S = 10.0


# --------------------------------------------------------------------------------------------
# The batch


def run_batch_ray(slide_paths: Sequence[str | Path], model_dir: str | Path, out: str | Path,
                  config: RunConfig = RunConfig(), *, settings: RaySettings = RaySettings(),
                  failures: Sequence[tuple[str | Path, str]] = (), progress: bool | None = None,
                  on_event: EventHook | None = None,
                  on_int8: Callable[[Int8Graph], None] | None = None) -> list[SlideResult]:
    """:func:`wsi_toolkit.pipeline.run_batch` on Ray: same outputs, skips, failures and summary.csv.

    Paths are made absolute (the workers run elsewhere); ``OUT`` must be a filesystem every node
    sees at the same path (checked at start: :class:`OutNotSharedError`). ``progress``: a bar (True),
    one line per change on stderr (False); None follows ``config.inference.progress``. Returns one
    :class:`~wsi_toolkit.pipeline.SlideResult` per slide, in the order given (``failures`` first).
    INT8 without a given calibration: :func:`~wsi_toolkit.pipeline.prepare_int8` here, before any
    worker starts (``on_int8`` as in :func:`~wsi_toolkit.pipeline.run_batch`).
    """
    ray = ray_module()
    out = Path(out).absolute()
    model_dir = Path(model_dir).absolute()
    if not model_dir.is_dir():
        raise ConfigError(f"model package folder {model_dir} does not exist")
    if config.inference.precision == "int8" and config.inference.calibration is None and slide_paths:
        from wsi_toolkit.model_package import load_model_package

        # the batch's INT8 policy, as run_batch: calibrated once here, on the batch's slides, before
        # any worker starts; the workers find the graph in the shared cache
        int8 = prepare_int8(slide_paths, load_model_package(model_dir), config)
        if int8 is not None:
            (on_int8 or (lambda g: log.info("%s", g.describe())))(int8)
    prepare_out(out)
    results: list[SlideResult | None] = [
        SlideResult(slide=str(arg), status="failed", error=error) for arg, error in failures]
    for _arg, error in failures:
        log.error("%s", error)
    taken: set[str] = set()
    queue: collections.deque[Item] = collections.deque()
    for path in slide_paths:
        placed = place_slide(out, Path(path).absolute(), taken)
        results.append(placed if isinstance(placed, SlideResult) else None)
        if isinstance(placed, SlideTask):
            queue.append(Item(order=len(results) - 1, task=placed))
    show = ClusterProgress(len(results), enabled=config.inference.progress if progress is None else progress)
    for r in results:
        if r is not None:
            show.slide_done(None, f"{r.slide}: {r.status}")
    if not queue:
        write_summary(out, [r for r in results if r is not None])
        show.close()
        return [r for r in results if r is not None]

    started_here = connect(settings)
    probe_dir = out / f".ray-probe-{uuid.uuid4().hex[:12]}"
    pool: Pool | None = None
    try:
        n_workers, options = plan_workers(ray, settings, config, len(queue))
        token = uuid.uuid4().hex
        probe_dir.mkdir()
        (probe_dir / PROBE_DRIVER_FILE).write_text(token + "\n", encoding="utf-8")
        log.info("Ray: %d worker(s), %s each, for %d slide(s)", n_workers, options, len(queue))
        pool = Pool(ray, str(model_dir), config, options, probe_dir, token, on_event, show)
        for i in range(n_workers):
            pool.start(i)
        _start_all(pool, settings)
        _drain(pool, queue, results, out, settings)
    finally:
        if pool is not None:
            for slot in pool.slots:
                pool.kill(slot)
        _remove_probe(probe_dir)
        show.close()
        if started_here:
            ray.shutdown()
    done = [r for r in results if r is not None]
    write_summary(out, done)
    return done


def _start_all(pool: Pool, settings: RaySettings) -> None:
    """Wait for every first worker to start and pass the probe; raise (before any slide) if one fails."""
    ray = pool.ray
    deadline = time.monotonic() + settings.start_timeout_s
    while pool.running:
        ready, _ = ray.wait(list(pool.running), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            waiting = [s.index for _, s, _ in pool.running.values()]
            raise WsiToolkitError(f"Ray worker(s) {waiting} did not start within {settings.start_timeout_s:g} s "
                                  f"(not enough free {'GPUs' if 'num_gpus' in pool.options else 'CPUs'} in the "
                                  f"cluster for {pool.options}?); lower --cpus-per-worker or add nodes")
        _, slot, _ = pool.running.pop(ready[0])
        try:
            reply = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            raise WsiToolkitError(f"Ray worker {slot.index} could not start: {short_error(exc)}") from None
        problem = pool.probe_ok(slot, reply)
        if problem is not None:
            raise OutNotSharedError(f"{problem}. --out must be a filesystem every node mounts at the same path "
                                    "(NFS, Lustre, CephFS, ...)")
        _ready(pool, slot)


def _ready(pool: Pool, slot: Slot) -> None:
    slot.state = "idle"
    pool.progress.worker(slot.index, slot.label, "idle", note=f"{slot.label}: ready (pid {slot.info.get('pid')})")
    pool.event("ready", slot, None)


def _hand_out(pool: Pool, queue: collections.deque[Item]) -> None:
    """Give each idle worker the next slide whose retry time has come."""
    now = time.perf_counter()
    for slot in [s for s in pool.slots if s.state == "idle"]:
        item = next((it for it in queue if it.not_before <= now), None)
        if item is None:
            break
        queue.remove(item)
        item.attempts += 1
        slot.state = "running"
        pool.running[slot.actor.run.remote(item.task, item.attempts)] = ("run", slot, item)
        pool.progress.worker(slot.index, slot.label, "running", item.task.slide.name,
                             note=f"{slot.label}: started {item.task.slide.name}"
                             + (f" (attempt {item.attempts})" if item.attempts > 1 else ""))
        pool.event("start", slot, str(item.task.slide))


def _drain(pool: Pool, queue: collections.deque[Item], results: list[SlideResult | None], out: Path,
           settings: RaySettings) -> None:
    """Hand the queue out to idle workers until every slide has a result."""
    ray = pool.ray
    replacements = len(queue) * settings.max_attempts + len(pool.slots)
    while queue or any(kind == "run" for kind, _, _ in pool.running.values()):
        _hand_out(pool, queue)
        if not pool.alive():
            while queue:
                left = queue.popleft()
                _finish(pool, results, out, left, _gave_up(left, "no Ray worker is left to run it"))
            break
        ready, _ = ray.wait(list(pool.running), num_returns=1, timeout=1.0) if pool.running else ([], [])
        if not ready:
            _check_start_timeouts(pool, settings)
            if not pool.running:
                time.sleep(0.2)  # only slides waiting for their retry time
            continue
        kind, slot, item = pool.running.pop(ready[0])
        try:
            value = ray.get(ready[0])
        except ray.exceptions.RayActorError as exc:
            _died(pool, slot, item, exc, queue, results, out, settings)
            if replacements > 0:
                replacements -= 1
                pool.start(max(s.index for s in pool.slots) + 1)
            continue
        except ray.exceptions.RayError as exc:  # raised inside the call: not the slide's fault alone
            if kind == "probe":
                pool.kill(slot)
                log.error("Ray worker %d could not start: %s", slot.index, short_error(exc))
                continue
            assert item is not None
            slot.state = "idle"
            _finish(pool, results, out, item, _gave_up(item, f"worker error: {short_error(exc)}"))
            continue
        if kind == "probe":
            problem = pool.probe_ok(slot, value)
            if problem is not None:  # a replacement on a node without OUT: never given a slide
                log.error("%s; that worker is not used", problem)
                pool.kill(slot)
                pool.progress.worker(slot.index, slot.label, "dead", note=problem)
                continue
            _ready(pool, slot)
            continue
        assert item is not None
        slot.state = "idle"
        result: SlideResult = value
        if result.status == "busy" and item.deaths and item.attempts < settings.max_attempts:
            # the dead worker's lock may outlive it a little on a network filesystem
            item.not_before = time.perf_counter() + 5.0
            queue.append(item)
            pool.progress.worker(slot.index, slot.label, "idle")
            continue
        pool.progress.worker(slot.index, slot.label, "idle", note=f"{slot.label}: idle")
        _finish(pool, results, out, item, result, slot)


def _died(pool: Pool, slot: Slot, item: Item | None, exc: BaseException, queue: collections.deque[Item],
          results: list[SlideResult | None], out: Path, settings: RaySettings) -> None:
    """A worker process (or its node) is gone: its slide goes back to the queue or is given up."""
    pool.kill(slot)
    where = f"worker {slot.index} (pid {slot.info.get('pid', '?')} on {slot.info.get('node', '?')})"
    reason = f"{where} died: {short_error(exc, 200)}"
    log.warning("%s%s", reason, f" while running {item.task.slide}" if item else "")
    pool.progress.worker(slot.index, slot.label, "dead", note=reason)
    pool.event("died", slot, str(item.task.slide) if item else None)
    if item is None:
        return
    item.deaths.append(reason)
    if item.attempts >= settings.max_attempts:
        _finish(pool, results, out, item, _gave_up(item, None))
    else:
        queue.appendleft(item)  # next free worker, first


def _gave_up(item: Item, why: str | None) -> SlideResult:
    path = item.task.slide
    if why is None:
        n = len(item.deaths)
        why = (f"the worker running it died {n} time{'s' if n > 1 else ''} (last: {item.deaths[-1]}); not "
               f"retried after {item.attempts} attempt{'s' if item.attempts > 1 else ''}")
    return record_failed(path, item.task.out_dir, f"{path}: {why}", item.t0)


def _finish(pool: Pool, results: list[SlideResult | None], out: Path, item: Item, result: SlideResult,
            slot: Slot | None = None) -> None:
    results[item.order] = result
    if time.monotonic() - pool.summary_written >= SUMMARY_EVERY_S:
        write_summary(out, [r for r in results if r is not None])
        pool.summary_written = time.monotonic()
    detail = f"score {result.slide_score:.3f}, {result.n_patches} patches" if result.slide_score is not None else (
        result.error.splitlines()[0][:160] if result.error else "")
    who = f"{slot.label}: " if slot is not None else ""
    pool.progress.slide_done(result.n_patches if result.status == "ok" else 0,
                             f"{who}{result.status} {item.task.slide.name} ({detail})")
    if slot is not None:
        pool.event("done", slot, str(item.task.slide))


def _check_start_timeouts(pool: Pool, settings: RaySettings) -> None:
    """A replacement worker that cannot be placed (no free resources left) is given up on."""
    now = time.monotonic()
    for ref, (kind, slot, _) in list(pool.running.items()):
        if kind == "probe" and now - slot.started > settings.start_timeout_s:
            pool.running.pop(ref)
            pool.kill(slot)
            log.error("Ray worker %d did not start within %g s; not used", slot.index, settings.start_timeout_s)
            pool.progress.worker(slot.index, slot.label, "dead")


def _remove_probe(probe_dir: Path) -> None:
    try:
        for p in probe_dir.iterdir():
            p.unlink(missing_ok=True)
        probe_dir.rmdir()
    except OSError:
        pass

