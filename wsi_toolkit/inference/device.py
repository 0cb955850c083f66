"""Device and precision for inference: which device, which autocast dtype, how the model runs there.

On CUDA the model runs under autocast (bf16 where supported, else fp16) in channels_last, with a
batch size that fills half the free GPU memory (:func:`cuda_batch_size`); on the CPU a TorchScript
model is frozen and fused (:class:`CpuGraph`) and fp32 is the default on every CPU.
:func:`cpu_has_fast_bf16` is defined in :mod:`wsi_toolkit.runtime.cpu` and re-exported here.
"""

from __future__ import annotations

import logging

import torch

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.model_package.torchscript import quiet_torchscript_deprecation
from wsi_toolkit.runtime.cpu import cpu_has_fast_bf16
from wsi_toolkit.runtime.names import TorchPrecision

__all__ = ["CPU_BATCH_SIZE", "CpuGraph", "autocast_dtype", "batch_for_memory", "cpu_has_fast_bf16",
           "cuda_batch_size", "prepare_model", "resolve_device"]

log = logging.getLogger(__name__)


#: ``batch_size="auto"`` off CUDA; why this size: BENCHMARKS.md ("Batch size, by measurement").
CPU_BATCH_SIZE = 64


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' asked for but MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
    return dev


def autocast_dtype(device: torch.device, precision: TorchPrecision) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None for fp32. ``auto`` is fp32 on a CPU
    and on MPS (so results do not depend on the CPU model), bf16 on CUDA where supported, else fp16."""
    if precision == "fp32":
        return None
    if precision == "auto" and device.type != "cuda":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class CpuGraph:
    """A TorchScript model on the CPU, run through the fastest graph path that works.

    fp32: the frozen graph with oneDNN Graph fusion (``torch.jit.enable_onednn_fusion``): conv +
    batchnorm + add + relu fused into oneDNN partitions, faster than ``optimize_for_inference``
    for a ResNet50 on a CPU (measured in BENCHMARKS.md). The profiling
    executor compiles the fused graph during the first calls; if that fails (not every graph is
    supported), the model falls back to ``freeze`` + ``optimize_for_inference``, then to the model as
    loaded, and says so in the log. bf16/fp16 autocast: ``optimize_for_inference`` (the fuser does
    not take autocast graphs). The fusion switch is process-wide: :meth:`__exit__` restores it.
    The fused graph is compiled per input shape (seconds each): a batch smaller than the
    largest seen runs padded to that size (patches are independent in eval mode).
    """

    def __init__(self, model: torch.jit.ScriptModule, *, fuse: bool):
        self._plain = model
        self.path = "plain"
        self._fused: torch.jit.ScriptModule | None = None
        self._model: torch.nn.Module = model
        self._fuse = fuse
        self._batch = 0  # largest batch seen: the shape the fused graph was compiled for
        self._was_enabled = torch.jit.onednn_fusion_enabled()

    def __enter__(self) -> CpuGraph:
        with quiet_torchscript_deprecation():
            if self._fuse:
                try:
                    torch.jit.enable_onednn_fusion(True)
                    self._fused = torch.jit.freeze(self._plain)
                    self._model, self.path = self._fused, "frozen+onednn-fusion"
                    return self
                except Exception as exc:  # pragma: no cover - depends on the graph
                    log.debug("oneDNN fusion unavailable (%s)", exc)
                    torch.jit.enable_onednn_fusion(self._was_enabled)
            self._use_optimized()
        return self

    def _use_optimized(self) -> None:
        try:
            with quiet_torchscript_deprecation():
                self._model = torch.jit.optimize_for_inference(torch.jit.freeze(self._plain))
            self.path = "frozen+optimize_for_inference"
        except Exception as exc:  # some graphs cannot be frozen; the plain model still works
            log.debug("optimize_for_inference failed (%s); using the model as loaded", exc)
            self._model, self.path = self._plain, "plain"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is None:
            return self._model(x)
        n = x.shape[0]
        self._batch = max(self._batch, n)
        if n < self._batch:
            x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        try:
            return self._fused(x)[:n]
        except RuntimeError as exc:
            log.warning("oneDNN-fused graph failed (%s); continuing with optimize_for_inference", exc)
            self._fused = None
            torch.jit.enable_onednn_fusion(self._was_enabled)
            self._use_optimized()
            return self._model(x[:n])

    def __exit__(self, *exc) -> None:
        torch.jit.enable_onednn_fusion(self._was_enabled)


class _Plain:
    """A model used as it is (CUDA, MPS, eager CPU models); same interface as :class:`CpuGraph`."""

    def __init__(self, model: torch.nn.Module, path: str):
        self._model, self.path = model, path

    def __enter__(self) -> _Plain:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(x)

    def __exit__(self, *exc) -> None:
        pass


def prepare_model(model: torch.nn.Module, device: torch.device, *, optimize: bool,
                  amp_dtype: torch.dtype | None = None) -> _Plain | CpuGraph:
    """Move to ``device`` in eval mode; channels_last on CUDA; on CPU a TorchScript model goes
    through :class:`CpuGraph`. Use the result as a context manager around the predictions; its
    ``path`` names the graph path taken."""
    model = model.to(device).eval()
    if device.type == "cuda":
        return _Plain(model.to(memory_format=torch.channels_last), "channels_last")
    if optimize and device.type == "cpu" and isinstance(model, torch.jit.ScriptModule):
        return CpuGraph(model, fuse=amp_dtype is None)
    return _Plain(model, "plain")


def batch_for_memory(per_patch_bytes: float, free_bytes: float, *, start: int = 64, cap: int = 1024,
                     fraction: float = 0.5) -> int:
    """The largest ``start * 2**k <= cap`` whose forward-pass memory (``per_patch_bytes`` each)
    fits in ``fraction`` of ``free_bytes``; ``start`` at least."""
    bs = start
    while bs * 2 <= cap and bs * 2 * per_patch_bytes <= fraction * free_bytes:
        bs *= 2
    return bs


def cuda_batch_size(model, preprocess: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                    patch_px: int, *, probe: int = 64, cap: int = 1024, fraction: float = 0.5) -> int:
    """Batch size that fills the GPU: one forward pass of ``probe`` patches (as inference runs
    them: uint8 -> preprocess -> channels_last -> autocast) measures the memory a patch needs,
    then :func:`batch_for_memory` against the free memory. The probe also warms up cuDNN."""
    x = torch.zeros((probe, patch_px, patch_px, 3), dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    amp = torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None)
    with torch.inference_mode(), amp:
        model(preprocess(x).contiguous(memory_format=torch.channels_last))
    torch.cuda.synchronize(device)
    per_patch = max(1.0, (torch.cuda.max_memory_allocated(device) - base) / probe)
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(per_patch, free, start=probe, cap=cap, fraction=fraction)
