"""One runtime/precision vocabulary (wsi_toolkit.runtime.names) behind every CLI and setting (issue 30:
it was written out in ~6 places, free to drift apart)."""

from __future__ import annotations

import click
import pytest

from wsi_toolkit.runtime.names import EVAL_PRECISIONS, PRECISIONS, RUNTIMES, TORCH_PRECISIONS


def _choices(command: click.Command, name: str) -> tuple[str, ...]:
    option = next(p for p in command.params if p.name == name)
    assert isinstance(option.type, click.Choice)
    return tuple(option.type.choices)


def test_wsi_infer_offers_every_precision_and_runtime_a_run_accepts():
    from wsi_toolkit.cli.infer import _command
    from wsi_toolkit.inference import InferenceConfig

    assert set(_choices(_command, "precision")) == {"auto", "fp32", "bf16", "fp16", "int8"}
    assert set(_choices(_command, "runtime")) == {"auto", "torch", "openvino"}
    for precision in _choices(_command, "precision"):  # each offered value is one the settings accept
        InferenceConfig(precision=precision, runtime="openvino" if precision == "int8" else "auto")
    for runtime in _choices(_command, "runtime"):
        InferenceConfig(runtime=runtime)


def test_a_precision_outside_the_vocabulary_is_refused_by_the_settings():
    from wsi_toolkit.errors import ConfigError
    from wsi_toolkit.inference import InferenceConfig

    with pytest.raises(ConfigError, match="precision"):
        InferenceConfig(precision="fp8")  # type: ignore[arg-type]


def test_training_and_evaluation_offer_their_subsets():
    pytest.importorskip("fastai")
    from patch_model.cli import _eval_command, _train_command
    from patch_model.train import TrainConfig

    train = _choices(_train_command, "precision")
    assert set(train) == {"auto", "fp32", "bf16", "fp16"} and set(train) <= set(PRECISIONS)
    assert set(_choices(_eval_command, "precision")) == {"auto", "fp32", "bf16", "int8"}
    assert set(_choices(_eval_command, "runtime")) == set(RUNTIMES)
    assert set(EVAL_PRECISIONS) | set(TORCH_PRECISIONS) == set(PRECISIONS)
    assert TrainConfig.__dataclass_fields__["precision"].default in train
