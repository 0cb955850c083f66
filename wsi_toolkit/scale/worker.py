"""The worker of a batch on Ray: a long-lived actor that holds the loaded model and runs slides.

:class:`SlideWorker` is a plain class; :mod:`wsi_toolkit.scale.driver` makes it a Ray actor (one
per GPU, or per ``cpus_per_worker`` CPUs without a GPU). Each slide goes through
:func:`wsi_toolkit.pipeline.run_slide_task`, the same per-slide step as a single-process
``wsi-infer`` (lock, skip/redo, outputs, failure recorded), with the worker's node and device
recorded in ``run.json`` under ``worker``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from wsi_toolkit.atomic import partial_path
from wsi_toolkit.pipeline import RunConfig, SlideResult, SlideTask, run_slide_task

__all__ = ["SlideWorker", "PROBE_DRIVER_FILE", "TEST_HOOK_ENV"]

#: The file the driver writes in the probe folder; every worker must read it back.
PROBE_DRIVER_FILE = "driver.txt"
#: Test hook, read by the workers (tests only): ``slow:NAME:SECONDS`` (the first attempt at slide file
#: NAME leaves a partial heatmap.tif and sleeps, so a test can kill the worker mid-slide) and
#: ``crash:NAME`` (every attempt at NAME ends the worker process, like a native crash), comma-separated.
TEST_HOOK_ENV = "WSI_TOOLKIT_RAY_TEST_HOOK"


class SlideWorker:
    """One worker: loads the model package once, then runs the slides it is given.

    ``config.inference.progress`` is turned off (the driver shows one display for the cluster);
    on a CPU-only worker torch uses ``cpus`` threads.
    """

    def __init__(self, model_dir: str, config: RunConfig, cpus: int, index: int):
        import torch

        from wsi_toolkit.inference import resolve_device
        from wsi_toolkit.model_package import load_model_package

        self.index = index
        self.config = replace(config, inference=replace(config.inference, progress=False))
        device = resolve_device(config.inference.device)
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
            device_name = f"cpu ({torch.get_num_threads()} threads)"
        elif device.type == "cuda":
            i = device.index if device.index is not None else torch.cuda.current_device()
            device_name = f"cuda:{i} ({torch.cuda.get_device_name(i)})"
        else:
            device_name = str(device)
        self.package = load_model_package(model_dir)
        try:
            import ray

            ctx = ray.get_runtime_context()
            node_id = ctx.get_node_id()
            node_ip = ray.util.get_node_ip_address()
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - used outside Ray (unit tests): no node id
            node_id, node_ip, gpu_ids = "", "", []
        self.info: dict[str, Any] = {
            "engine": "ray", "worker": index, "node": socket.gethostname(), "node_ip": node_ip,
            "node_id": node_id, "device": device_name, "gpu_ids": gpu_ids, "pid": os.getpid(),
        }

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: node, address, device, process id."""
        return dict(self.info)

    def probe(self, probe_dir: str, token: str) -> dict[str, Any]:
        """Check that this node sees the batch's ``--out``: read the driver's probe file, write one
        of its own. Returns :meth:`describe` plus ``ok`` and, when not, ``error``."""
        folder = Path(probe_dir)
        info = self.describe()
        try:
            seen = (folder / PROBE_DRIVER_FILE).read_text(encoding="utf-8").strip()
        except OSError as exc:
            return {**info, "ok": False, "error": f"cannot read {folder / PROBE_DRIVER_FILE} ({exc.strerror or exc})"}
        if seen != token:
            return {**info, "ok": False, "error": f"{folder} holds another batch's probe: not the driver's folder"}
        try:
            (folder / f"worker-{self.index}-{os.getpid()}.txt").write_text(f"{token}\n", encoding="utf-8")
        except OSError as exc:
            return {**info, "ok": False, "error": f"cannot write in {folder} ({exc.strerror or exc})"}
        return {**info, "ok": True, "probe_file": f"worker-{self.index}-{os.getpid()}.txt"}

    def run(self, task: SlideTask, attempt: int) -> SlideResult:
        """Run (or skip) one slide; a failure is recorded and returned, never raised."""
        return run_slide_task(task, self.package, self.config, worker={**self.info, "attempt": attempt},
                              before_run=_test_hook(task.slide.name, attempt))


def _test_hook(slide_name: str, attempt: int):
    """The :data:`TEST_HOOK_ENV` behaviour for this slide and attempt, or None (always, outside tests)."""
    spec = os.environ.get(TEST_HOOK_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rest = item.partition(":")
        if kind == "crash" and rest == slide_name:
            return lambda out_dir: os._exit(70)
        if kind == "slow" and attempt == 1:
            name, _, seconds = rest.rpartition(":")
            if name == slide_name:
                return lambda out_dir: _slow(out_dir, float(seconds))
    return None


def _slow(out_dir: Path, seconds: float) -> None:
    """Leave a partial heatmap.tif, as a writer killed mid-write would, and wait ``seconds``."""
    partial = partial_path(out_dir / "heatmap.tif")
    partial.write_bytes(b"partial work of a worker that is about to be killed")
    time.sleep(seconds)
    partial.unlink(missing_ok=True)
