"""The driver's view of its Ray workers: the queue items (:class:`Item`), one slot per worker
(:class:`Slot`), how many workers the cluster takes (:func:`plan_workers`) and the pool of them
with the calls in flight (:class:`Pool`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_toolkit.analysis import RunConfig
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.pipeline import SlideTask
from wsi_toolkit.scale.progress import ClusterProgress
from wsi_toolkit.scale.settings import RaySettings
from wsi_toolkit.scale.worker import SlideWorker

#: ``on_event(kind, worker, slide)``: kind is ready, start, done, died; ``worker`` the worker's
#: :meth:`~wsi_toolkit.scale.worker.SlideWorker.describe` (``{"worker": index}`` before it is known).
EventHook = Callable[[str, dict[str, Any], str | None], None]


@dataclass
class Item:
    order: int
    task: SlideTask
    attempts: int = 0
    deaths: list[str] = field(default_factory=list)
    not_before: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Slot:
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


def plan_workers(ray: Any, settings: RaySettings, config: RunConfig, n_slides: int) -> tuple[int, dict[str, Any]]:
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


def short_error(exc: BaseException, limit: int = 300) -> str:
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


class Pool:
    """The workers and the calls in flight on them."""

    def __init__(self, ray: Any, model_dir: str, config: RunConfig, options: dict[str, Any], probe_dir: Path,
                 token: str, on_event: EventHook | None, progress: ClusterProgress):
        self.ray, self.model_dir, self.config, self.options = ray, model_dir, config, options
        self.probe_dir, self.token, self.on_event, self.progress = probe_dir, token, on_event, progress
        self.actor_class = ray.remote(SlideWorker).options(max_restarts=0, max_concurrency=1, **options)
        self.slots: list[Slot] = []
        self.summary_written = -float("inf")
        self.running: dict[Any, tuple[str, Slot, Item | None]] = {}

    def start(self, index: int) -> Slot:
        actor = self.actor_class.remote(self.model_dir, self.config, int(self.options.get("num_cpus", 1)), index)
        slot = Slot(index=index, actor=actor)
        self.slots.append(slot)
        self.running[actor.probe.remote(str(self.probe_dir), self.token)] = ("probe", slot, None)
        self.progress.worker(index, slot.label, "starting")
        return slot

    def event(self, kind: str, slot: Slot, slide: str | None) -> None:
        if self.on_event is not None:
            self.on_event(kind, dict(slot.info) or {"worker": slot.index}, slide)

    def probe_ok(self, slot: Slot, reply: dict[str, Any]) -> str | None:
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

    def kill(self, slot: Slot) -> None:
        slot.state = "dead"
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def alive(self) -> list[Slot]:
        return [s for s in self.slots if s.state != "dead"]

