"""A model package on disk: load it (:func:`load_model_package`), write it (:func:`save_model_package`).

Files::

    my-model/
      config.json            the config (:mod:`wsi_toolkit.model_package.config`)
      torchscript_model.pt   TorchScript: (N, 3, S, S) float32 -> (N, num_classes) logits (WSInfer's file)
      model.pt2              optional: the same model as a torch.export program, batch size dynamic

``torchscript_model.pt`` is what WSInfer, QuPath and the WSInfer zoo use, and stays. TorchScript is
deprecated in torch 2.14 in favour of ``torch.export`` (and ``torch.compile`` cannot compile a
ScriptModule), so :func:`save_model_package` also writes ``model.pt2`` when the model exports and
the exported program gives the eager model's logits. :func:`load_model_package` prefers it on
accelerators; on the CPU it loads the TorchScript by default, because inference there runs a
frozen, oneDNN-fused TorchScript graph that costs 0.7x the CPU time of the exported program
(ResNet18 / ResNet50 at 96 px, torch 2.14; both give the same probabilities).

Identity: ``ModelPackage.sha256`` is the sha256 of ``torchscript_model.pt`` (as before, and as for a
zoo package without ``model.pt2``). ``config.json`` records it (``wsi_toolkit.sha256``) and that of
``model.pt2`` (``wsi_toolkit.pt2_sha256``); ``model.pt2`` is loaded only when both files match
what is recorded, i.e. it is the program written together with (and checked against) the
TorchScript that the sha256 names. Otherwise the TorchScript is loaded, with a log line.

Neither reader is a sandbox: a TorchScript archive is code (its ``forward`` runs whatever it was
compiled with) read with a restricted unpickler; ``torch.export.load`` unpickles parts of the
archive. Load packages only from sources you trust, as you would run their scripts (README,
"What a model package may do"). ``torch.load`` is never used on the weights.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsi_toolkit.atomic import file_sha256, write_text_atomic
from wsi_toolkit.errors import ModelPackageError
from wsi_toolkit.limits import PATCH_PX_RANGE, check_int
from wsi_toolkit.model_package.config import (
    CONFIG_NAME,
    EXPORT_NAME,
    TORCHSCRIPT_NAME,
    ModelConfig,
    read_config_json,
)
from wsi_toolkit.model_package.logits import probabilities
from wsi_toolkit.model_package.preprocess import Preprocess
from wsi_toolkit.model_package.torchscript import quiet_torchscript_deprecation

# quiet_torchscript_deprecation is defined in .torchscript; listed here too, as before.
__all__ = ["ModelPackage", "load_model_package", "save_model_package", "set_calibration",
           "quiet_torchscript_deprecation"]

logger = logging.getLogger(__name__)

NAMESPACE = "wsi_toolkit"


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


class ExportedModel(torch.nn.Module):
    """A ``model.pt2`` program (:func:`torch.export.load` ``(...).module()``) as a module inference
    can move (``.to``) and put in eval mode. The graph was captured in eval mode (batch-norm running
    statistics, no dropout): it has no training mode."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.graph = graph
        self.training = False

    def forward(self, x: torch.Tensor) -> Any:
        return self.graph(x)

    def train(self, mode: bool = True) -> ExportedModel:
        if mode:
            raise ModelPackageError(f"a model loaded from {EXPORT_NAME} is an inference graph exported in eval mode; "
                                    "it has no training mode (train the eager model)")
        return self


@dataclass
class ModelPackage:
    """A loaded model package. ``model`` maps ``(N, 3, S, S)`` normalised float32 to logits.

    ``format`` says which file ``model`` came from: ``"torch.export"`` (``model.pt2``) or
    ``"torchscript"``; ``sha256`` is the package's identity either way (see the module docstring).
    """

    path: Path
    config: ModelConfig
    model: torch.nn.Module
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    format: str = "torchscript"
    preprocess: Preprocess = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.device = torch.device(self.device)
        self.preprocess = Preprocess(self.config)

    @property
    def temperature(self) -> float:
        """The package's fitted temperature (:attr:`ModelConfig.temperature`; 1.0 without calibration)."""
        return self.config.temperature

    @torch.inference_mode()
    def predict_logits(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 patches -> ``(N, num_classes)`` float32 logits on the CPU, as the
        model returns them (no temperature)."""
        if not isinstance(patches_uint8, torch.Tensor):
            patches_uint8 = torch.as_tensor(patches_uint8)
        x = self.preprocess(patches_uint8.to(self.device, non_blocking=True))
        return _as_logits(self.model(x), self.config).float().cpu()

    @torch.inference_mode()
    def predict_class_proba(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 patches -> ``(N, num_classes)`` float32 probabilities on the CPU
        (softmax over classes; sigmoid for a one-output model) of the logits divided by the
        package's :attr:`temperature`."""
        if not isinstance(patches_uint8, torch.Tensor):
            patches_uint8 = torch.as_tensor(patches_uint8)
        x = self.preprocess(patches_uint8.to(self.device, non_blocking=True))
        return probabilities(_as_logits(self.model(x), self.config), self.temperature).cpu()

    def predict_proba(self, patches_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 patches -> ``(N,)`` float32 tumour probability on the CPU."""
        return self.predict_class_proba(patches_uint8)[:, self.config.tumor_index()].contiguous()

    def export_program(self) -> Any:
        """The package's ``torch.export`` program (``model.pt2``, on the CPU) when it has one recorded
        with the TorchScript that :attr:`sha256` names and this torch reads it; else None (logged)."""
        return _read_program(self.path, self.config, self.sha256)

    def load_torchscript(self) -> torch.jit.ScriptModule:
        """The package's TorchScript model on ``device`` (``model`` itself when that is it), e.g. for
        TorchScript-only optimisations; its sha256 is checked against :attr:`sha256`."""
        if isinstance(self.model, torch.jit.ScriptModule):
            return self.model
        pt_path = self.path / TORCHSCRIPT_NAME
        if file_sha256(pt_path) != self.sha256:
            raise ModelPackageError(f"changed since the package was loaded (sha256 is not {self.sha256})",
                                    source=pt_path)
        return _load_torchscript(pt_path, self.device)


def _as_logits(out: Any, config: ModelConfig, *, source: str | None = None) -> torch.Tensor:
    """Model output as ``(N, num_classes)``; a one-output model may return ``(N,)``."""
    if not isinstance(out, torch.Tensor):
        raise ModelPackageError(f"the model must return one tensor of logits; got {type(out).__name__}",
                                source=source)
    if out.ndim == 1 and config.num_classes == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[1] != config.num_classes:
        got = out.shape[1] if out.ndim == 2 else f"output shape {tuple(out.shape)}"
        raise ModelPackageError(
            f"class count mismatch: config expects num_classes={config.num_classes} "
            f"(class_names {list(config.class_names)}), got {got} from the model "
            f"(output shape {tuple(out.shape)} for a batch of 1)", field="num_classes", source=source)
    return out


def _check_model_output(model: torch.nn.Module, config: ModelConfig, device: torch.device, *,
                        source: str) -> None:
    s = config.input_size
    with torch.inference_mode():
        try:
            out = model(torch.zeros(1, 3, s, s, device=device))
        except Exception as e:  # noqa: BLE001 - report any model failure as a package error
            raise ModelPackageError(
                f"the model fails on a (1, 3, {s}, {s}) input (input_size from the config's transform): "
                f"{type(e).__name__}: {e}", source=source) from e
        _as_logits(out, config, source=source)


# --------------------------------------------------------------------------------------------
# Load


def _load_torchscript(pt_path: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        with quiet_torchscript_deprecation():
            model = torch.jit.load(str(pt_path), map_location=device)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError/... for bad archives
        raise ModelPackageError(
            f"not a TorchScript archive torch.jit.load can read ({_first_line(e)}); "
            "export the model with torch.jit.trace/script and save_model_package", source=pt_path) from None
    return model.eval()


def _read_program(root: Path, config: ModelConfig, sha: str) -> Any:
    """The ``model.pt2`` program (on the CPU), or None (with a log line saying why) when the package
    has none, it is not the one recorded with this TorchScript, or this torch cannot read it."""
    pt2 = root / EXPORT_NAME
    if not pt2.is_file():
        return None
    recorded = config.extra.get("pt2_sha256")
    if recorded is None or config.extra.get("sha256") != sha:
        logger.info("%s: not recorded with this %s in %s (%s.pt2_sha256 / sha256); using the TorchScript", pt2,
                    TORCHSCRIPT_NAME, CONFIG_NAME, NAMESPACE)
        return None
    pt2_sha = file_sha256(pt2)
    if pt2_sha != recorded:
        logger.warning("%s: sha256 %s does not match %s recorded in %s; falling back to %s", pt2, pt2_sha[:12],
                       str(recorded)[:12], CONFIG_NAME, TORCHSCRIPT_NAME)
        return None
    try:
        return torch.export.load(str(pt2))
    except Exception as e:  # noqa: BLE001 - a program of another torch version, a damaged archive, ...
        logger.warning("%s: cannot be used with torch %s (%s); falling back to %s", pt2, torch.__version__,
                       _first_line(e), TORCHSCRIPT_NAME)
        return None


def _load_exported(root: Path, config: ModelConfig, sha: str, device: torch.device) -> ExportedModel | None:
    """:func:`_read_program` as a module on ``device`` that passes the load check, or None (logged)."""
    program = _read_program(root, config, sha)
    if program is None:
        return None
    try:
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        model = ExportedModel(program.module()).to(device)
        _check_model_output(model, config, device, source=str(root / EXPORT_NAME))
    except Exception as e:  # noqa: BLE001 - ops this device lacks, a program that fails on its input, ...
        logger.warning("%s: cannot be used on %s (%s); falling back to %s", root / EXPORT_NAME, device,
                       _first_line(e), TORCHSCRIPT_NAME)
        return None
    return model


def load_model_package(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                       verify_sha256: bool = True, prefer_export: bool | None = None) -> ModelPackage:
    """Load and validate a model package directory (``config.json`` + ``torchscript_model.pt``, and
    ``model.pt2`` when present).

    The model comes from ``model.pt2`` (``torch.export.load``) when ``prefer_export`` (default: on
    any device but the CPU, see the module docstring) and that file is the one recorded with the
    TorchScript and loads and runs here; otherwise from ``torchscript_model.pt``
    (``torch.jit.load``). ``torch.load`` is never used; neither format is a sandbox: load only
    trusted packages. The config's class count is checked against the model's
    output on a zero batch of one patch; a recorded ``wsi_toolkit.sha256`` must match the
    TorchScript file. Errors: :class:`ModelPackageError` naming the file (and the field).
    """
    root = Path(path)
    device = torch.device(device)
    if not root.exists():
        raise ModelPackageError(f"model package {str(root)!r} does not exist; pass the directory holding "
                                f"{CONFIG_NAME} and {TORCHSCRIPT_NAME}")
    if not root.is_dir():
        raise ModelPackageError(f"model package {str(root)!r} is not a directory; pass the directory holding "
                                f"{CONFIG_NAME} and {TORCHSCRIPT_NAME}")
    cfg_path, pt_path = root / CONFIG_NAME, root / TORCHSCRIPT_NAME
    if not cfg_path.is_file():
        raise ModelPackageError(f"missing; a model package holds {CONFIG_NAME} and {TORCHSCRIPT_NAME}",
                                source=cfg_path)
    config = ModelConfig.from_dict(read_config_json(cfg_path), source=cfg_path)
    if not pt_path.is_file():
        raise ModelPackageError(f"missing; a model package holds {CONFIG_NAME} and {TORCHSCRIPT_NAME}",
                                source=pt_path)
    sha = file_sha256(pt_path)
    recorded = config.extra.get("sha256")
    if verify_sha256 and recorded is not None and recorded != sha:
        raise ModelPackageError(
            f"sha256 {sha} does not match {recorded} recorded in {CONFIG_NAME} ({NAMESPACE}.sha256); "
            "the weights changed after export", source=pt_path)
    if prefer_export is None:
        prefer_export = device.type != "cpu"
    model: torch.nn.Module | None = _load_exported(root, config, sha, device) if prefer_export else None
    fmt = "torch.export"
    if model is None:
        model, fmt = _load_torchscript(pt_path, device), "torchscript"
        _check_model_output(model, config, device, source=str(root))
    logger.info("loaded model package %s (%s, %d classes, input %d px, %s, sha256 %s)", root,
                config.architecture, config.num_classes, config.input_size, fmt, sha[:12])
    return ModelPackage(path=root, config=config, model=model, sha256=sha, device=device, format=fmt)


# --------------------------------------------------------------------------------------------
# Save


def _to_torchscript(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """Trace ``model`` (checked on a second random input), or script it if tracing fails."""
    if isinstance(model, torch.jit.ScriptModule):
        return model, "script"
    errors = []
    gen = torch.Generator().manual_seed(1)
    check = torch.randn(example.shape, generator=gen).to(example.device)
    with torch.no_grad():
        expected = model(check)
        try:
            with quiet_torchscript_deprecation():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(model, example, check_trace=False)
            got = traced(check)
            if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.shape == expected.shape \
                    and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                return traced, "trace"
            errors.append("trace: the traced model disagrees with the eager model on a second input")
        except Exception as e:  # noqa: BLE001
            errors.append(f"trace: {type(e).__name__}: {e}")
        try:
            with quiet_torchscript_deprecation():
                return torch.jit.script(model), "script"
        except Exception as e:  # noqa: BLE001
            errors.append(f"script: {type(e).__name__}: {e}")
    raise ModelPackageError("could not convert the model to TorchScript; " + "; ".join(errors))


def _to_exported(model: torch.nn.Module, size: int) -> tuple[Any, str]:
    """``model`` as a torch.export program with a dynamic batch size, checked against the eager
    model on random batches of 1 and 3; ``(None, why)`` when that fails (the package is then
    TorchScript only)."""
    if isinstance(model, torch.jit.ScriptModule):
        return None, "a ScriptModule cannot be exported with torch.export (pass the eager module)"
    try:
        t0 = time.perf_counter()
        batch = torch.export.Dim("batch", min=1)
        # A batch of 2: an example dimension of size 1 would be specialised to 1.
        program = torch.export.export(model, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
        exported = program.module()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n in (1, 3):
                x = torch.randn(n, 3, size, size, generator=gen)
                want, got = model(x), exported(x)
                if not (isinstance(got, torch.Tensor) and got.shape == want.shape
                        and torch.allclose(got, want, rtol=1e-4, atol=1e-5)):
                    return None, f"the exported program disagrees with the eager model on a batch of {n}"
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, unsupported ops, old torch, ...
        return None, f"torch.export failed ({_first_line(e)})"
    return program, f"exported in {time.perf_counter() - t0:.1f} s"


def save_model_package(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    example_size: int | None = None,
    overwrite: bool = False,
    export: bool = True,
) -> Path:
    """Write ``model`` and ``config`` as a model package directory at ``path``; returns ``path``.

    The model (in eval mode, on the CPU) is traced with a ``(1, 3, S, S)`` example,
    ``S = example_size or config.input_size`` (scripted instead if tracing fails or disagrees
    with the eager model; a ``ScriptModule`` is saved as it is). With ``export`` an eager model is
    also exported with ``torch.export`` (batch size dynamic) to ``model.pt2`` when that works and
    gives the eager model's logits (log line and TorchScript only otherwise). The files' sha256s
    are recorded in the config (``wsi_toolkit.sha256``, ``wsi_toolkit.pt2_sha256``), then
    ``config.json`` is written; all go to a temporary directory beside ``path`` that is renamed into
    place, so a crash never leaves half a package. An existing non-empty ``path`` is refused unless
    ``overwrite=True``, and even then only when it looks like a model package.
    """
    dest = Path(path)
    if dest.exists():
        if not dest.is_dir():
            raise ModelPackageError(f"{str(dest)!r} exists and is not a directory")
        contents = list(dest.iterdir())
        if contents and not overwrite:
            raise ModelPackageError(f"{str(dest)!r} exists and is not empty; pass overwrite=True to replace it")
        if contents and not ({CONFIG_NAME, TORCHSCRIPT_NAME} & {p.name for p in contents}):
            raise ModelPackageError(f"{str(dest)!r} is not empty and does not look like a model package "
                                    f"(no {CONFIG_NAME} / {TORCHSCRIPT_NAME}); refusing to replace it")
    size = config.input_size if example_size is None else check_int(
        example_size, "example_size", bounds=PATCH_PX_RANGE, unit="px", error=ModelPackageError)

    was_training = model.training
    src = model
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        src = copy.deepcopy(model).cpu()
    src.eval()
    try:
        scripted, method = _to_torchscript(src, torch.zeros(1, 3, size, size))
        _check_model_output(scripted, config, torch.device("cpu"), source="model passed to save_model_package")
        program, export_note = _to_exported(src, size) if export else (None, "not asked for (export=False)")
    finally:
        model.train(was_training)
    failed = program is None and export and not isinstance(src, torch.jit.ScriptModule)
    logger.log(logging.WARNING if failed else logging.INFO,
               "%s: %s%s", dest / EXPORT_NAME, export_note,
               "" if program is not None else f"; the package holds {TORCHSCRIPT_NAME} only")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        pt = tmp / TORCHSCRIPT_NAME
        with quiet_torchscript_deprecation():
            scripted.save(str(pt))
        hashes = {"sha256": file_sha256(pt)}
        if program is not None:
            torch.export.save(program, str(tmp / EXPORT_NAME))
            hashes["pt2_sha256"] = file_sha256(tmp / EXPORT_NAME)
        info = {"torchscript": method, "example_size": size, "torch_version": torch.__version__,
                "torch_export": EXPORT_NAME if program is not None else None}
        final_config = config.without_extra("sha256", "pt2_sha256").with_extra(**hashes, export=info)
        (tmp / CONFIG_NAME).write_text(final_config.to_json(), encoding="utf-8")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            old.rmdir()
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved model package %s (%s%s, sha256 %s)", dest, method,
                f" + {EXPORT_NAME}" if program is not None else "", hashes["sha256"][:12])
    return dest


def set_calibration(path: str | os.PathLike, calibration: Mapping[str, Any] | None) -> ModelConfig:
    """Record ``calibration`` (``{"method": "temperature", "temperature": T, ...}``, e.g. from
    :func:`wsi_toolkit.reliability.temperature_calibration`; None removes it) in the package's
    ``config.json`` as ``wsi_toolkit.calibration``, checked by the schema and written atomically;
    returns the new config. The weights are untouched, so the package's sha256 (and any converted
    OpenVINO graph) stays; the sha256 of ``config.json`` changes, so ``wsi-infer`` redoes slides
    made at the old temperature."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelPackageError(f"missing; a model package holds {CONFIG_NAME} and {TORCHSCRIPT_NAME}",
                                source=cfg_path)
    config = ModelConfig.from_dict(read_config_json(cfg_path), source=cfg_path)
    try:
        new = (config.without_extra("calibration") if calibration is None
               else config.with_extra(calibration=dict(calibration)))
    except ModelPackageError as e:
        raise e._located(source=cfg_path) from None
    write_text_atomic(cfg_path, new.to_json())
    logger.info("%s: calibration %s", cfg_path, "removed" if calibration is None
                else f"temperature {new.temperature:.4g}")
    return new
