"""How a batch uses Ray (:class:`RaySettings`) and joining or starting it (:func:`connect`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.limits import check_int, check_number


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


def ray_module():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'wsi-toolkit[ray]'") from None
    return ray


def connect(settings: RaySettings) -> bool:
    """Start or join Ray as ``settings.address`` says; True when this call started it (the caller
    shuts it down), False when Ray was already initialised here."""
    ray = ray_module()
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

