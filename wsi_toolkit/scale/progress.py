"""One progress display for a batch on a cluster: slides done/total, patches/s, each worker's state.

With ``enabled`` a tqdm bar (slides) whose postfix shows patches/s and the workers; without, one
line per change on ``stream`` (stderr), which suits batch logs::

    [ray] 3/8 slides, 1520 patches/s | w0@node1 cpu: running b.tif 12 s | w1@node2 cuda:0: idle
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["ClusterProgress"]


@dataclass
class _Worker:
    label: str
    state: str = "starting"
    slide: str = ""
    since: float = field(default_factory=time.monotonic)


class ClusterProgress:
    """Slides done of ``total``, patches per second since the first slide started, worker states."""

    def __init__(self, total: int, *, enabled: bool, stream: TextIO | None = None):
        self.total, self.done, self.patches = total, 0, 0
        self.t0: float | None = None
        self.stream = stream if stream is not None else sys.stderr
        self.workers: dict[int, _Worker] = {}
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="slide", desc="slides", file=self.stream, dynamic_ncols=True)

    # -- events ----------------------------------------------------------------------------------

    def worker(self, index: int, label: str, state: str, slide: str = "", note: str = "") -> None:
        """Worker ``index`` is now ``state`` (starting, idle, running, dead) on ``slide``."""
        w = self.workers.setdefault(index, _Worker(label))
        w.label, w.state, w.slide, w.since = label, state, slide, time.monotonic()
        if state == "running" and self.t0 is None:
            self.t0 = time.monotonic()
        self._show(note or f"{label}: {state}{' ' + slide if slide else ''}")

    def slide_done(self, n_patches: int | None, note: str) -> None:
        """A slide finished (any status); ``n_patches`` counts towards patches/s when it ran."""
        self.done += 1
        self.patches += int(n_patches or 0)
        if self._bar is not None:
            self._bar.update(1)
        self._show(note)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # -- display ---------------------------------------------------------------------------------

    def patches_per_s(self) -> float:
        if self.t0 is None:
            return 0.0
        return self.patches / max(time.monotonic() - self.t0, 1e-9)

    def states(self) -> str:
        now = time.monotonic()
        parts = []
        for _, w in sorted(self.workers.items()):
            if w.state == "running":
                parts.append(f"{w.label}: running {w.slide} {now - w.since:.0f} s")
            else:
                parts.append(f"{w.label}: {w.state}")
        return " | ".join(parts)

    def _show(self, note: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.patches_per_s():.0f} patches/s | {self.states()}", refresh=True)
            return
        print(f"[ray] {self.done}/{self.total} slides, {self.patches_per_s():.0f} patches/s; {note} | {self.states()}",
              file=self.stream, flush=True)
