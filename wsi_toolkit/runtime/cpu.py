"""What the CPU computes natively: the probes that choose a CPU precision.

:func:`cpu_has_fast_bf16` lives here, in the runtime (where the model runs), because both the
runtime's choices (:mod:`.select`, :mod:`.openvino`: bf16 only where native) and the inference
loop's documentation of ``precision`` (:mod:`wsi_toolkit.inference.device`, which re-exports it)
depend on it. No torch: it reads ``/proc/cpuinfo``.
"""

from __future__ import annotations

__all__ = ["cpu_has_fast_bf16"]


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast
    speeds up convolutions; elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
