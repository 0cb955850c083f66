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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.limits import check_int, check_number
from wsi_toolkit.pipeline import (
    RunConfig,
    SlideResult,
    SlideTask,
    place_slide,
    prepare_out,
    record_failed,
    write_summary,
)
from wsi_toolkit.scale.progress import ClusterProgress
from wsi_toolkit.scale.worker import PROBE_DRIVER_FILE, SlideWorker

__all__ = ["RaySettings", "run_batch_ray", "connect", "OutNotSharedError"]

log = logging.getLogger(__name__)

#: ``summary.csv`` is rebuilt (a scan of every slide folder in ``OUT``) at most this often while
#: slides finish, and once at the end: with many workers on a network filesystem, rebuilding it
#: after every slide would keep the driver from handing out slides.
SUMMARY_EVERY_S = 10.0
#: ``on_event(kind, worker, slide)``: kind is ready, start, done, died; ``worker`` the worker's
#: :meth:`~wsi_toolkit.scale.worker.SlideWorker.describe` (``{"worker": index}`` before it is known).
EventHook = Callable[[str, dict[str, Any], str | None], None]


class OutNotSharedError(ConfigError):
    """A worker's node does not see ``--out`` (not a filesystem every node mounts at the same path)."""


@dataclass(frozen=True)
class RaySettings:
    """How the batch uses Ray.

    ``address``: ``local`` (start Ray in this process for this batch), ``auto`` (the cluster this
    machine belongs to, ``ray start``), or a cluster address (``HOST:PORT``, ``ray://HOST:PORT``).
    An already initialised Ray (``ray.init`` called by the caller) is used as it is.
    ``cpus_per_worker``: CPUs one worker reserves (None: 1 beside its GPU, else 4, at most what
    the cluster has). ``max_workers``: at most this many workers (None: one per GPU, or as many as
    the CPUs allow). ``max_attempts``: how often a slide is started before a worker that keeps
    dying on it has it recorded as failed. ``num_cpus``: CPUs of a ``local`` Ray (None: all).
    ``start_timeout_s``: how long a worker may take to start (placed, model loaded, probe done).
    """

    address: str = "local"
    cpus_per_worker: int | None = None
    max_workers: int | None = None
    max_attempts: int = 3
    num_cpus: int | None = None
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip():
            raise ConfigError(f"ray address must be local, auto or HOST:PORT; got {self.address!r}")
        if self.cpus_per_worker is not None:
            check_int(self.cpus_per_worker, "cpus_per_worker")
        if self.max_workers is not None:
            check_int(self.max_workers, "max_workers")
        check_int(self.max_attempts, "max_attempts")
        if self.num_cpus is not None:
            check_int(self.num_cpus, "num_cpus")
        check_number(self.start_timeout_s, "start_timeout_s", positive=True, unit="s")


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'wsi-toolkit[ray]'") from None
    return ray


def connect(settings: RaySettings) -> bool:
    """Start or join Ray as ``settings.address`` says; True when this call started it (the caller
    shuts it down), False when Ray was already initialised here."""
    ray = _ray()
    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    try:
        if settings.address == "local":
            ray.init(address="local", num_cpus=settings.num_cpus, **common)
        else:
            if settings.num_cpus is not None:
                raise ConfigError("num_cpus applies to --ray local only (a cluster has its own)")
            ray.init(address=settings.address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray at {settings.address!r} ({exc}); start a cluster with "
                          "`ray start --head` (then `ray start --address=HEAD:6379` on the other machines) "
                          "or use --ray local") from None
    return True


# --------------------------------------------------------------------------------------------
# Workers


@dataclass
class _Item:
    order: int
    task: SlideTask
    attempts: int = 0
    deaths: list[str] = field(default_factory=list)
    not_before: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class _Slot:
    index: int
    actor: Any
    state: str = "starting"  # starting, idle, running, dead
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        node = self.info.get("node") or "?"
        device = str(self.info.get("device", "")).split(" (")[0]
        return f"w{self.index}@{node}" + (f" {device}" if device else "")


def _plan_workers(ray: Any, settings: RaySettings, config: RunConfig, n_slides: int) -> tuple[int, dict[str, Any]]:
    """(number of workers, Ray actor options) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if gpus > 0 and config.inference.device != "cpu":
        n, options = gpus, {"num_gpus": 1, "num_cpus": settings.cpus_per_worker or 1}
    else:
        if cpus < 1:
            raise ConfigError(f"the Ray cluster offers no CPU to run workers on ({res})")
        per = min(settings.cpus_per_worker or 4, cpus)
        if settings.cpus_per_worker and settings.cpus_per_worker > cpus:
            raise ConfigError(f"--cpus-per-worker {settings.cpus_per_worker} is more than the cluster's {cpus} CPUs")
        n, options = max(1, cpus // per), {"num_cpus": per}
    n = min(n, settings.max_workers or n, max(n_slides, 1))
    return n, options


def _short(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of a Ray error (they carry long tracebacks)."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            text = ln
            break
    else:
        text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Pool:
    """The workers and the calls in flight on them."""

    def __init__(self, ray: Any, model_dir: str, config: RunConfig, options: dict[str, Any], probe_dir: Path,
                 token: str, on_event: EventHook | None, progress: ClusterProgress):
        self.ray, self.model_dir, self.config, self.options = ray, model_dir, config, options
        self.probe_dir, self.token, self.on_event, self.progress = probe_dir, token, on_event, progress
        self.actor_class = ray.remote(SlideWorker).options(max_restarts=0, max_concurrency=1, **options)
        self.slots: list[_Slot] = []
        self.summary_written = -float("inf")
        self.running: dict[Any, tuple[str, _Slot, _Item | None]] = {}

    def start(self, index: int) -> _Slot:
        actor = self.actor_class.remote(self.model_dir, self.config, int(self.options.get("num_cpus", 1)), index)
        slot = _Slot(index=index, actor=actor)
        self.slots.append(slot)
        self.running[actor.probe.remote(str(self.probe_dir), self.token)] = ("probe", slot, None)
        self.progress.worker(index, slot.label, "starting")
        return slot

    def event(self, kind: str, slot: _Slot, slide: str | None) -> None:
        if self.on_event is not None:
            self.on_event(kind, dict(slot.info) or {"worker": slot.index}, slide)

    def probe_ok(self, slot: _Slot, reply: dict[str, Any]) -> str | None:
        """None when the worker and the driver both saw each other's probe file, else why not."""
        slot.info = {k: v for k, v in reply.items() if k not in ("ok", "error", "probe_file")}
        where = f"worker {slot.index} on {reply.get('node')} ({reply.get('node_ip')})"
        if not reply.get("ok"):
            return f"{where} does not see --out: {reply.get('error')}"
        try:
            back = (self.probe_dir / str(reply["probe_file"])).read_text(encoding="utf-8").strip()
        except OSError as exc:
            return f"{where} wrote its probe file, but this machine cannot read it ({exc.strerror or exc})"
        return None if back == self.token else f"{where} wrote a probe file this machine reads differently"

    def kill(self, slot: _Slot) -> None:
        slot.state = "dead"
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def alive(self) -> list[_Slot]:
        return [s for s in self.slots if s.state != "dead"]


# --------------------------------------------------------------------------------------------
# The batch


def run_batch_ray(slide_paths: Sequence[str | Path], model_dir: str | Path, out: str | Path,
                  config: RunConfig = RunConfig(), *, settings: RaySettings = RaySettings(),
                  failures: Sequence[tuple[str | Path, str]] = (), progress: bool | None = None,
                  on_event: EventHook | None = None) -> list[SlideResult]:
    """:func:`wsi_toolkit.pipeline.run_batch` on Ray: same outputs, skips, failures and summary.csv.

    Paths are made absolute (the workers run elsewhere); ``OUT`` must be a filesystem every node
    sees at the same path (checked at start: :class:`OutNotSharedError`). ``progress``: a bar (True),
    one line per change on stderr (False); None follows ``config.inference.progress``. Returns one
    :class:`~wsi_toolkit.pipeline.SlideResult` per slide, in the order given (``failures`` first).
    """
    ray = _ray()
    out = Path(out).absolute()
    model_dir = Path(model_dir).absolute()
    if not model_dir.is_dir():
        raise ConfigError(f"model package folder {model_dir} does not exist")
    prepare_out(out)
    results: list[SlideResult | None] = [
        SlideResult(slide=str(arg), status="failed", error=error) for arg, error in failures]
    for _arg, error in failures:
        log.error("%s", error)
    taken: set[str] = set()
    queue: collections.deque[_Item] = collections.deque()
    for path in slide_paths:
        placed = place_slide(out, Path(path).absolute(), taken)
        results.append(placed if isinstance(placed, SlideResult) else None)
        if isinstance(placed, SlideTask):
            queue.append(_Item(order=len(results) - 1, task=placed))
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
    pool: _Pool | None = None
    try:
        n_workers, options = _plan_workers(ray, settings, config, len(queue))
        token = uuid.uuid4().hex
        probe_dir.mkdir()
        (probe_dir / PROBE_DRIVER_FILE).write_text(token + "\n", encoding="utf-8")
        log.info("Ray: %d worker(s), %s each, for %d slide(s)", n_workers, options, len(queue))
        pool = _Pool(ray, str(model_dir), config, options, probe_dir, token, on_event, show)
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


def _start_all(pool: _Pool, settings: RaySettings) -> None:
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
            raise WsiToolkitError(f"Ray worker {slot.index} could not start: {_short(exc)}") from None
        problem = pool.probe_ok(slot, reply)
        if problem is not None:
            raise OutNotSharedError(f"{problem}. --out must be a filesystem every node mounts at the same path "
                                    "(NFS, Lustre, CephFS, ...)")
        _ready(pool, slot)


def _ready(pool: _Pool, slot: _Slot) -> None:
    slot.state = "idle"
    pool.progress.worker(slot.index, slot.label, "idle", note=f"{slot.label}: ready (pid {slot.info.get('pid')})")
    pool.event("ready", slot, None)


def _drain(pool: _Pool, queue: collections.deque[_Item], results: list[SlideResult | None], out: Path,
           settings: RaySettings) -> None:
    """Hand the queue out to idle workers until every slide has a result."""
    ray = pool.ray
    replacements = len(queue) * settings.max_attempts + len(pool.slots)
    while queue or any(kind == "run" for kind, _, _ in pool.running.values()):
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
        if not pool.alive():
            for item in list(queue):
                queue.remove(item)
                _finish(pool, results, out, item, _gave_up(item, "no Ray worker is left to run it"))
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
                log.error("Ray worker %d could not start: %s", slot.index, _short(exc))
                continue
            assert item is not None
            slot.state = "idle"
            _finish(pool, results, out, item, _gave_up(item, f"worker error: {_short(exc)}"))
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


def _died(pool: _Pool, slot: _Slot, item: _Item | None, exc: BaseException, queue: collections.deque[_Item],
          results: list[SlideResult | None], out: Path, settings: RaySettings) -> None:
    """A worker process (or its node) is gone: its slide goes back to the queue or is given up."""
    pool.kill(slot)
    where = f"worker {slot.index} (pid {slot.info.get('pid', '?')} on {slot.info.get('node', '?')})"
    reason = f"{where} died: {_short(exc, 200)}"
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


def _gave_up(item: _Item, why: str | None) -> SlideResult:
    path = item.task.slide
    if why is None:
        n = len(item.deaths)
        why = (f"the worker running it died {n} time{'s' if n > 1 else ''} (last: {item.deaths[-1]}); not "
               f"retried after {item.attempts} attempt{'s' if item.attempts > 1 else ''}")
    return record_failed(path, item.task.out_dir, f"{path}: {why}", item.t0)


def _finish(pool: _Pool, results: list[SlideResult | None], out: Path, item: _Item, result: SlideResult,
            slot: _Slot | None = None) -> None:
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


def _check_start_timeouts(pool: _Pool, settings: RaySettings) -> None:
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

