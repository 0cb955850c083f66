"""The package's model run by OpenVINO on a CPU: fp32 (agrees with torch within 1e-4), bf16, INT8.

The model is converted once with ``openvino.convert_model`` (from the package's ``torch.export``
program ``model.pt2`` where it has one, else from its TorchScript) and cached (:mod:`.cache`) by
the package's sha256 and every setting the graph depends on. A new fp32 conversion is checked
against torch on probe patches before it is cached: if the probabilities differ by more than
:data:`FP32_TOLERANCE`, it is refused (:class:`ConversionError`) like a conversion that failed, and
the caller runs torch instead. INT8 is NNCF's post-training static quantization of that fp32 graph,
calibrated on uint8 patches (:mod:`.calibration`); its agreement with fp32 on the calibration
patches is measured when it is built and recorded. bf16 is a compile-time hint on the fp32 graph.

Preprocessing (uint8 -> resize -> normalise) stays :class:`wsi_toolkit.model_package.Preprocess`, so
OpenVINO sees exactly the tensors torch sees; :class:`OpenVinoModel` takes them and returns logits.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from wsi_toolkit.errors import ConfigError, WsiToolkitError, one_line
from wsi_toolkit.model_package.logits import probabilities
from wsi_toolkit.model_package.preprocess import Preprocess
from wsi_toolkit.model_package.torchscript import quiet_torchscript_deprecation
from wsi_toolkit.runtime import cpu  # cpu.cpu_has_fast_bf16 looked up when called (tests patch it there)
from wsi_toolkit.runtime.cache import MODEL_XML, CacheKey, default_cache_dir, get_or_build
from wsi_toolkit.runtime.calibration import CALIBRATION_PATCHES, CalibrationSet
from wsi_toolkit.runtime.names import OV_PRECISIONS, OvPrecision

if TYPE_CHECKING:
    from wsi_toolkit.model_package import ModelPackage
    from wsi_toolkit.model_package.config import ModelConfig

__all__ = ["AUTO_CALIBRATION", "FP32_TOLERANCE", "ConversionError", "OpenVinoModel",
           "load_openvino_model", "openvino_available", "openvino_versions", "prepare_openvino_graph"]

log = logging.getLogger(__name__)

#: Largest |probability difference| from torch fp32 accepted for an OpenVINO fp32 graph.
FP32_TOLERANCE = 1e-4
#: The cache key's ``calibration`` of an INT8 graph calibrated automatically (no ``--calibration``):
#: on the tissue of the slides of the run that built it. Later runs on any slides reuse that graph.
AUTO_CALIBRATION = f"auto: {CALIBRATION_PATCHES} patches of slide tissue, drawn once per package"
#: The patches an automatically calibrated INT8 graph was calibrated on, kept in its cache entry.
CALIBRATION_NPY = "calibration.npy"
#: NNCF settings of the INT8 graph (part of its cache key).
QUANTIZATION = {"method": "nncf.quantize", "preset": "performance", "fast_bias_correction": True}

_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_CHANGES = {
    "fp32": "nothing intended: the same fp32 network run by OpenVINO (probabilities checked within 1e-4 of torch "
            "when converted)",
    "bf16": "convolutions and matrix products computed in bfloat16 (8-bit mantissa) by OpenVINO",
    "int8": "weights and activations of convolutions and linear layers quantized to int8 (NNCF post-training static "
            "quantization, calibrated); the other layers in fp32",
}


class ConversionError(WsiToolkitError, RuntimeError):
    """OpenVINO could not convert, quantize or compile the model, or its fp32 graph disagrees with
    torch; the caller runs the model with torch instead (and says so in the log)."""


def openvino_available() -> bool:
    """True when the ``openvino`` package is installed (``pip install 'wsi-toolkit[openvino]'``)."""
    return importlib.util.find_spec("openvino") is not None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def openvino_versions() -> dict[str, str | None]:
    return {"openvino": _version("openvino"), "nncf": _version("nncf")}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the expected noise of conversion: TorchScript's deprecation, tracer warnings, and
    torch's "No CUDA runtime" line that importing NNCF logs on a CPU-only machine."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with quiet_torchscript_deprecation(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(openvino|nncf|torch)\b.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(openvino|nncf|torch)\b.*")
            yield
    finally:
        cpp_log.setLevel(level)


def _probabilities(logits: np.ndarray | torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of logits. The conversion and quantization checks compare the network's own
    outputs (``temperature`` 1): the graph and its cache entry are keyed by the weights, not by the
    package's calibration, which is applied after the graph (:meth:`OpenVinoModel.predict_class_proba`,
    the inference loop)."""
    return probabilities(torch.as_tensor(logits), temperature).numpy()


def _tumor_column(package: ModelPackage, probs: np.ndarray) -> np.ndarray:
    return probs[:, package.config.tumor_index()] if probs.shape[1] > 1 else probs[:, 0]


def probe_patches(patch_px: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """Probe patches for the fp32 agreement check: half uniform noise, half smooth colour fields."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n // 2, patch_px, patch_px, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:patch_px, 0:patch_px] / max(1, patch_px - 1)
    smooth = []
    for _ in range(n - n // 2):
        a, b, c = rng.uniform(0, 255, (3, 3))
        field = a[None, None] + (b - a)[None, None] * xx[..., None] + (c - a)[None, None] * yy[..., None] ** 2
        smooth.append(np.clip(field, 0, 255).astype(np.uint8))
    return np.concatenate([noise, np.stack(smooth)])


def _preprocessed(package: ModelPackage, patches_u8: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return Preprocess(package.config)(torch.from_numpy(np.ascontiguousarray(patches_u8))).numpy()


def _torch_probs(package: ModelPackage, patches_u8: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return _probabilities(package.model(torch.from_numpy(_preprocessed(package, patches_u8))))


def decline_telemetry() -> None:
    """Decline OpenVINO's and NNCF's usage telemetry in this process.

    Both send usage events (Google Analytics, through ``openvino_telemetry``) and keep a client id
    and a usage count under ``~/intel`` unless a consent file there says no (OpenVINO's switch:
    ``opt_in_out --opt_out``); with no consent file, as after ``pip install``, importing them counts
    as consent. wsi-toolkit promises no network at run time, so before it imports either it answers
    "declined" to their consent check, in this process only: nothing is sent, nothing is written
    under ``~/intel``, the user's consent file is neither read nor changed. Called before every
    OpenVINO or NNCF import here; code that imported OpenVINO before wsi-toolkit did keeps the
    consent it had."""
    try:
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:  # no telemetry package: nothing to decline
        return
    declined = opt_in_checker.ConsentCheckResult.DECLINED
    opt_in_checker.OptInChecker.check = lambda self, *args, **kwargs: declined


def _ov() -> Any:
    """The ``openvino`` module, imported with its telemetry declined (:func:`decline_telemetry`)."""
    decline_telemetry()
    import openvino

    return openvino


def _source(package: ModelPackage) -> tuple[Any, str]:
    """What to convert: the package's ``torch.export`` program where it has one (``model.pt2``, checked
    against the package's sha256 by :meth:`~wsi_toolkit.model_package.ModelPackage.export_program`),
    else its TorchScript."""
    program = package.export_program() if hasattr(package, "export_program") else None
    if program is not None:
        return program, "torch.export"
    model = package.load_torchscript() if hasattr(package, "load_torchscript") else package.model
    return model, "torchscript"


def _convert(package: ModelPackage, src: Any, source: str):
    ov = _ov()
    s = package.config.input_size
    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    try:
        with _quiet():
            if source == "torch.export":
                model = ov.convert_model(src)
            else:
                model = ov.convert_model(src, example_input=torch.zeros(2, 3, s, s))
    finally:  # convert_model sets the root logger to ERROR and leaves it so when it fails: our fallback
        root.setLevel(state[0])  # warning would be lost
        root.filters, root.handlers = state[1], state[2]
    model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, s, s])})  # any batch size
    return model


def _compile(model: Any, precision: OvPrecision, threads: int | None, hint: str = "LATENCY"):
    ov = _ov()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(model, "CPU", config)


def in_graph_steps(config: ModelConfig) -> list[tuple[str, Any]] | None:
    """The package's ``transform`` as OpenVINO PrePostProcessor steps on ``(N, P, P, 3)`` uint8
    patches, or None where the graph cannot do exactly what :class:`Preprocess` does: a Resize
    that shrinks the patch (torch's antialiased filter; OpenVINO's linear resize is not) or a
    non-square one. Steps: ``("resize", S)``, ``("normalize", (mean, std))``; the uint8 -> [0, 1]
    scaling and NHWC -> NCHW come first, as in :class:`Preprocess`."""
    side = config.patch_size_pixels
    steps: list[tuple[str, Any]] = []
    for step in config.transform:
        if step.name == "Resize" and step.size is not None:
            if step.size < side or not (isinstance(step.arguments["size"], int)
                                        or len(set(step.arguments["size"])) == 1):
                return None
            if step.size != side:  # Preprocess skips a Resize to the size the patch has
                steps.append(("resize", step.size))
                side = step.size
        elif step.name == "Normalize":
            steps.append(("normalize", (list(map(float, step.arguments["mean"])),
                                        list(map(float, step.arguments["std"])))))
    return steps if side == config.input_size else None


def _with_preprocessing(model: Any, config: ModelConfig, steps: list[tuple[str, Any]]) -> Any:
    """``model`` (float NCHW input) with ``steps`` (:func:`in_graph_steps`) in front of it, built by
    OpenVINO's PrePostProcessor: its input becomes ``(N, P, P, 3)`` uint8 RGB, the package's patches."""
    ov = _ov()
    from openvino.preprocess import PrePostProcessor, ResizeAlgorithm

    Layout, Type = ov.Layout, ov.Type

    ppp = PrePostProcessor(model)
    side = config.patch_size_pixels
    ppp.input().tensor().set_element_type(Type.u8).set_layout(Layout("NHWC")).set_spatial_static_shape(side, side)
    ppp.input().model().set_layout(Layout("NCHW"))
    pre = ppp.input().preprocess().convert_element_type(Type.f32).convert_layout(Layout("NCHW")).scale(255.0)
    for name, arg in steps:
        if name == "resize":
            pre = pre.resize(ResizeAlgorithm.RESIZE_LINEAR)  # to the model's (static) input side
        else:
            pre = pre.mean(arg[0]).scale(arg[1])
    return ppp.build()


def _infer(compiled: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    request = compiled.create_infer_request()
    out = []
    for i in range(0, len(x), batch):
        request.infer({0: np.ascontiguousarray(x[i:i + batch])})
        out.append(np.array(request.get_output_tensor(0).data, np.float32, copy=True))
    return np.concatenate(out)


def _build_fp32(package: ModelPackage, src: Any, source: str, threads: int | None, folder: Path) -> dict:
    ov = _ov()
    t0 = time.perf_counter()
    model = _convert(package, src, source)
    ov.save_model(model, str(folder / MODEL_XML), compress_to_fp16=False)
    probe = probe_patches(package.config.patch_size_pixels)
    p_ov = _probabilities(_infer(_compile(model, "fp32", threads), _preprocessed(package, probe)))
    p_torch = _torch_probs(package, probe)
    dp = float(np.abs(p_ov - p_torch).max())
    if not dp <= FP32_TOLERANCE:
        raise ConversionError(f"the OpenVINO fp32 graph disagrees with torch by up to {dp:.3g} in probability "
                              f"(more than {FP32_TOLERANCE:g}) on {len(probe)} probe patches")
    return {"source": source, "seconds_convert": round(time.perf_counter() - t0, 3),
            "fp32_vs_torch": {"max_abs_dp": dp, "n_patches": len(probe), "patches": "probe (noise + smooth)"}}


NO_NNCF = "precision int8 needs NNCF: pip install 'wsi-toolkit[openvino]'"


def _import_nncf():
    decline_telemetry()
    try:
        with _quiet():
            import nncf
    except ImportError:
        raise ConfigError(NO_NNCF) from None
    # NNCF logs INFO lines to stdout; not nncf.set_log_level, which also sets the level of every
    # handler it finds on its logger (pytest's capture handlers included).
    logging.getLogger("nncf").setLevel(logging.ERROR)
    return nncf


def _build_int8(package: ModelPackage, fp32_xml: Path, calibration: CalibrationSet, threads: int | None,
                folder: Path) -> dict:
    ov = _ov()
    nncf = _import_nncf()
    t0 = time.perf_counter()
    fp32 = ov.Core().read_model(str(fp32_xml))
    x = _preprocessed(package, calibration.patches)
    batches = [x[i:i + 32] for i in range(0, len(x), 32)]
    with _quiet(), contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stderr, as ours
        quantized = nncf.quantize(fp32, nncf.Dataset(batches), subset_size=len(batches),
                                  preset=nncf.QuantizationPreset.PERFORMANCE, fast_bias_correction=True)
    ov.save_model(quantized, str(folder / MODEL_XML), compress_to_fp16=False)
    seconds = time.perf_counter() - t0
    p8 = _tumor_column(package, _probabilities(_infer(_compile(quantized, "int8", threads), x)))
    p32 = _tumor_column(package, _probabilities(_infer(_compile(fp32, "fp32", threads), x)))
    dp = np.abs(p8 - p32)
    return {"seconds_quantize": round(seconds, 3), "calibration": calibration.describe(),
            "int8_vs_fp32": {"patches": "the calibration patches", "n_patches": len(x), "max_abs_dp": float(dp.max()),
                             "mean_abs_dp": float(dp.mean()), "flips_at_0.5": int(((p8 >= 0.5) != (p32 >= 0.5)).sum())}}


class OpenVinoModel:
    """A compiled OpenVINO model with the interface of the inference loop's models: a context
    manager, called with a preprocessed ``(N, 3, S, S)`` float32 tensor (with :attr:`takes_uint8`:
    the ``(N, P, P, 3)`` uint8 patches), returning logits. ``path`` names it (``"openvino-int8"``);
    ``info`` is what ``run.json`` records about it (the same on every run of the same model and
    settings); ``stats`` how this load went (cache ``"hit"`` or ``"built"``, the entry's folder,
    seconds), which goes with the timings."""

    def __init__(self, compiled: Any, package: ModelPackage, precision: OvPrecision, info: Mapping[str, Any],
                 stats: Mapping[str, Any] | None = None, n_requests: int = 1, takes_uint8: bool = False):
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.package = package
        self.precision = precision
        self.path = f"openvino-{precision}"
        self.info = dict(info)
        self.stats = dict(stats or {})
        #: Infer requests :meth:`pipelined` keeps in flight (1: one request at a time, as ``__call__``).
        self.n_requests = int(n_requests)
        #: True: the package's preprocessing is in the graph, which takes the ``(N, P, P, 3)`` uint8
        #: patches themselves (the inference loop then skips :class:`Preprocess`).
        self.takes_uint8 = bool(takes_uint8)

    @contextlib.contextmanager
    def pipelined(self, on_logits: Callable[[torch.Tensor, Any], None]
                  ) -> Iterator[Callable[[torch.Tensor, Any], None]]:
        """``submit(x, userdata)`` starting batches asynchronously on :attr:`n_requests` infer requests
        (OpenVINO's ``AsyncInferQueue``), so the caller reads and preprocesses the next batch while
        the model runs. ``on_logits(logits, userdata)`` is called once per batch (from OpenVINO's
        threads, in completion order, not submission order) with the logits of that batch. Leaving
        the block waits for every batch; an error in ``on_logits`` is raised there (or by the next
        ``submit``)."""
        ov = _ov()
        queue = ov.AsyncInferQueue(self._compiled, max(1, self.n_requests))
        errors: list[BaseException] = []

        def done(request: Any, userdata: Any) -> None:
            if errors:
                return
            try:
                on_logits(torch.from_numpy(np.array(request.get_output_tensor(0).data, np.float32, copy=True)),
                          userdata)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        queue.set_callback(done)

        def submit(x: torch.Tensor, userdata: Any) -> None:
            if errors:
                raise errors[0]
            queue.start_async({0: self._array(x)}, userdata, share_inputs=False)  # copied: the caller may reuse x

        try:
            yield submit
        finally:
            queue.wait_all()
        if errors:
            raise errors[0]

    def __enter__(self) -> OpenVinoModel:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _array(self, x: torch.Tensor) -> np.ndarray:
        if self.takes_uint8:
            if x.dtype != torch.uint8:
                raise ConfigError("this OpenVINO model takes (N, P, P, 3) uint8 patches (preprocessing in the graph); "
                                  f"got {x.dtype}")
            return x.detach().to("cpu").contiguous().numpy()
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``: preprocessed ``(N, 3, S, S)`` float32, or with :attr:`takes_uint8` the
        ``(N, P, P, 3)`` uint8 patches."""
        self._request.infer({0: self._array(x)}, share_inputs=True)
        return torch.from_numpy(np.array(self._request.get_output_tensor(0).data, np.float32, copy=True))

    def predict_logits(self, patches_uint8: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 patches -> ``(N, num_classes)`` float32 logits (no temperature)."""
        x = np.asarray(patches_uint8, np.uint8)
        return _infer(self._compiled, x if self.takes_uint8 else _preprocessed(self.package, x))

    def predict_class_proba(self, patches_uint8: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 patches -> ``(N, num_classes)`` float32 probabilities at the package's
        temperature (as :meth:`wsi_toolkit.model_package.ModelPackage.predict_class_proba`)."""
        return _probabilities(self.predict_logits(patches_uint8), self.package.config.temperature)

    def predict_proba(self, patches_uint8: np.ndarray | torch.Tensor) -> np.ndarray:
        return _tumor_column(self.package, self.predict_class_proba(patches_uint8))


def check_precision_supported(precision: str, *, force_bf16: bool = False) -> OvPrecision:
    """``precision`` if OpenVINO can run it here; :class:`ConfigError` otherwise (bf16 on a CPU
    without native bfloat16, where it would be emulated, unless ``force_bf16``)."""
    if precision not in OV_PRECISIONS:
        raise ConfigError(f"OpenVINO precision must be one of {', '.join(OV_PRECISIONS)}; got {precision!r}")
    if precision == "bf16" and not force_bf16 and not cpu.cpu_has_fast_bf16():
        raise ConfigError("precision bf16 needs a CPU with native bfloat16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo); "
                          "this one has neither, so it would be emulated: use fp32 or int8, or force bf16")
    return precision  # type: ignore[return-value]


def _check_loadable(package: ModelPackage, prec: OvPrecision, calibration: Any) -> None:
    if not openvino_available():
        raise ConfigError("runtime openvino needs OpenVINO: pip install 'wsi-toolkit[openvino]'")
    if package.device.type != "cpu":
        raise ConfigError(f"runtime openvino runs on the CPU; the package is loaded on {package.device}")
    if prec == "int8" and calibration is None:
        raise ConfigError("precision int8 needs calibration patches (from the slides' tissue or a PCam folder)")
    if prec == "int8" and importlib.util.find_spec("nncf") is None:
        # Only looked up here (importing NNCF takes ~0.4 s); it is imported when a graph is quantized,
        # not on a run that finds the quantized graph in the cache.
        raise ConfigError(NO_NNCF)


def prepare_openvino_graph(package: ModelPackage, *, precision: str = "fp32", cache_dir: str | Path | None = None,
                           calibration: CalibrationSet | Callable[[], CalibrationSet] | None = None,
                           force_bf16: bool = False, threads: int | None = None) -> tuple[Path, dict, dict]:
    """The cache entry holding the package's graph for ``precision``, converted (and for ``int8``
    quantized) now if the cache has none: ``(folder, info, stats)``. Nothing is compiled.

    ``calibration`` (int8 only) is either a :class:`CalibrationSet` (its fingerprint keys the
    quantized graph) or a function drawing one. A function is the automatic calibration on the
    slides being run: it is called only when the cache has no automatically calibrated graph of
    this package, and the graph it gives is reused by every later run on any slides (the key holds
    :data:`AUTO_CALIBRATION`, the entry the patches it was calibrated on). ``stats["calibration"]``
    says which happened: ``"given"``, ``"drawn"`` (calibrated now) or ``"cached"``.
    """
    prec = check_precision_supported(precision, force_bf16=force_bf16)
    _check_loadable(package, prec, calibration)
    threads = threads or torch.get_num_threads()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    versions = openvino_versions()
    t0 = time.perf_counter()
    size = package.config.input_size
    fp32_key = CacheKey(package_sha256=package.sha256, graph="fp32", input_size=size,
                        openvino=str(versions["openvino"]))
    stats: dict[str, Any] = {}
    try:
        # The source is loaded only to build: reading model.pt2 alone takes seconds.
        folder, entry, built = get_or_build(root, fp32_key,
                                            lambda d: _build_fp32(package, *_source(package), threads, d))
        info: dict[str, Any] = {**entry["info"]}
        if prec == "int8":
            assert calibration is not None
            given = isinstance(calibration, CalibrationSet)
            key = CacheKey(package_sha256=package.sha256, graph="int8", input_size=size,
                           openvino=str(versions["openvino"]), nncf=versions["nncf"],
                           calibration=calibration.fingerprint if isinstance(calibration, CalibrationSet)
                           else AUTO_CALIBRATION,
                           quantization=QUANTIZATION)
            fp32_xml = folder / MODEL_XML
            drawn: list[float] = []

            def build_int8(d: Path) -> dict:
                if isinstance(calibration, CalibrationSet):
                    cal = calibration
                else:
                    t = time.perf_counter()
                    cal = calibration()
                    drawn.append(time.perf_counter() - t)
                    np.save(d / CALIBRATION_NPY, cal.patches, allow_pickle=False)
                return _build_int8(package, fp32_xml, cal, threads, d)

            folder, entry, built8 = get_or_build(root, key, build_int8)
            built = built or built8
            info.update(entry["info"])
            stats["calibration"] = "given" if given else ("drawn" if built8 else "cached")
            if drawn:
                stats["seconds_calibration"] = round(drawn[0], 3)
    except (ConfigError, ConversionError):
        raise
    except Exception as exc:  # noqa: BLE001 - OpenVINO/NNCF raise many types; all mean "use torch"
        raise ConversionError(f"OpenVINO could not prepare the model of {package.path} at {prec}: "
                              f"{type(exc).__name__}: {one_line(exc)}") from exc
    stats.update({k: info.pop(k) for k in ("seconds_convert", "seconds_quantize") if k in info and built})
    for k in ("seconds_convert", "seconds_quantize"):
        info.pop(k, None)
    stats.update({"cache": "built" if built else "hit", "cache_entry": str(folder),
                  "seconds_prepare": round(time.perf_counter() - t0, 3)})
    if stats.get("calibration") == "cached":
        log.info("INT8: the quantized graph of this package is cached (calibrated once on %s); nothing calibrated "
                 "now (--calibration DIR calibrates on other patches)", info.get("calibration", {}).get("source"))
    return folder, info, stats


def load_openvino_model(package: ModelPackage, *, precision: str = "fp32", cache_dir: str | Path | None = None,
                        calibration: CalibrationSet | Callable[[], CalibrationSet] | None = None,
                        force_bf16: bool = False, threads: int | None = None,
                        requests: int | None = 1, preprocess: Literal["graph", "torch"] = "graph") -> OpenVinoModel:
    """The package's model compiled by OpenVINO for the CPU at ``precision`` (converted and cached on
    first use; the cache under ``cache_dir`` or :func:`~.cache.default_cache_dir`).

    ``int8`` needs ``calibration``: a set, or a function drawing one only when the cache has no
    automatically calibrated graph yet (:func:`prepare_openvino_graph`); ``threads`` defaults to
    torch's intra-op thread count. ``requests``: 1 compiles for latency (one request at a time, all
    threads on it); ``None`` compiles with OpenVINO's THROUGHPUT hint (several CPU streams) and
    keeps its optimal number of requests in flight (:meth:`OpenVinoModel.pipelined`); a number
    N > 1 keeps N requests in flight on the THROUGHPUT hint's streams. ``preprocess="graph"`` puts
    the package's preprocessing (uint8 -> float, NHWC -> NCHW, upsampling Resize, Normalize) into
    the compiled graph with OpenVINO's PrePostProcessor, so the model takes the uint8 patches
    (:attr:`OpenVinoModel.takes_uint8`), where it can do what torch does (:func:`in_graph_steps`;
    fp32 within 1e-4 of it); ``"torch"`` (or a shrinking Resize) keeps :class:`Preprocess`.
    Raises :class:`ConfigError` for settings that cannot work here (OpenVINO or NNCF not installed,
    bf16 without native support, int8 without calibration, a package on a GPU) and
    :class:`ConversionError` when conversion, quantization or compilation fails or the fp32 graph
    disagrees with torch: run torch instead.
    """
    prec = check_precision_supported(precision, force_bf16=force_bf16)
    threads = threads or torch.get_num_threads()
    t0 = time.perf_counter()
    folder, info, stats = prepare_openvino_graph(package, precision=prec, cache_dir=cache_dir, calibration=calibration,
                                                 force_bf16=force_bf16, threads=threads)
    t1 = time.perf_counter()
    if preprocess not in ("graph", "torch"):
        raise ConfigError(f"OpenVINO preprocess must be graph or torch; got {preprocess!r}")
    steps = in_graph_steps(package.config) if preprocess == "graph" else None
    try:
        graph: Any = str(folder / MODEL_XML)
        if steps is not None:
            ov = _ov()
            graph = _with_preprocessing(ov.Core().read_model(graph), package.config, steps)
        if requests == 1:
            compiled, n_requests = _compile(graph, prec, threads), 1
        else:
            compiled = _compile(graph, prec, threads, hint="THROUGHPUT")
            n_requests = requests or int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises many types; all mean "use torch"
        raise ConversionError(f"OpenVINO could not compile the model of {package.path} at {prec}: "
                              f"{type(exc).__name__}: {one_line(exc)}") from exc
    stats.update({"seconds_compile": round(time.perf_counter() - t1, 3), "requests": n_requests,
                  "seconds_load": round(time.perf_counter() - t0, 3)})
    info.update({
        "runtime": "openvino", "precision": prec, "inference_precision_hint": _HINT[prec], "threads": threads,
        "changes": _CHANGES[prec], "openvino": openvino_versions()["openvino"],
        "nncf": openvino_versions()["nncf"] if prec == "int8" else None,
    })
    if prec == "bf16" and force_bf16:
        info["forced"] = True
    info["preprocessing"] = "in the graph (OpenVINO PrePostProcessor)" if steps is not None else "torch"
    log.info("OpenVINO %s model ready (from %s, cache %s, %.1f s)", prec, info.get("source"), stats["cache"],
             stats["seconds_load"])
    return OpenVinoModel(compiled, package, prec, info, stats, n_requests=n_requests, takes_uint8=steps is not None)
