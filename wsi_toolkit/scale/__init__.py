"""Scale-out: ``wsi-infer`` batches on a Ray cluster (optional extra ``wsi-toolkit[ray]``).

:func:`run_batch_ray` is :func:`wsi_toolkit.pipeline.run_batch` with slides as the unit of work,
handed out to long-lived workers (:mod:`wsi_toolkit.scale.worker`: one per GPU, or per
``cpus_per_worker`` CPUs) that hold the loaded model and run the same per-slide step; the driver
(:mod:`wsi_toolkit.scale.driver`) keeps the queue, the retries of slides whose worker died, the
summary and one progress display (:mod:`wsi_toolkit.scale.progress`). Importing this package does
not import Ray; running a batch does.
"""

from __future__ import annotations

from wsi_toolkit.scale.driver import run_batch_ray
from wsi_toolkit.scale.settings import OutNotSharedError, RaySettings, connect

__all__ = ["run_batch_ray", "RaySettings", "OutNotSharedError", "connect"]
