"""The patch data sets as fastai DataLoaders: uint8 items, batch transforms on the device.

On validation batches the transforms are exactly inference's ``Preprocess`` of the exported
config (/255, bilinear antialiased resize, normalise), so a model sees at inference what it saw
in validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patch_model._fastai import Categorize, DataLoaders, Datasets, IntToFloatTensor, Normalize, TensorImage, Transform
from patch_model.augment import SYMMETRIES, DihedralBatch, HedJitterBatch, ResizeBatch, ScannerItem, parse_augment
from patch_model.data import CLASS_NAMES
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.model_package import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PatchData", "build_dataloaders", "labels_of"]


class _ReadPatch(Transform):
    """Item index -> ``TensorImage`` uint8 ``(3, 96, 96)`` (the patch, CHW)."""

    def __init__(self, source: torch.utils.data.Dataset):
        super().__init__()
        self.source = source

    def encodes(self, i):
        patch = np.asarray(self.source[int(i)][0])
        if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[-1] != 3:
            raise ConfigError(f"patch {int(i)} is {patch.shape} {patch.dtype}; expected (H, W, 3) uint8 RGB")
        return TensorImage(torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).contiguous())


class _ReadLabel(Transform):
    """Item index -> class name (``Categorize`` then maps it to its index in the vocab)."""

    def __init__(self, labels: np.ndarray, names: Sequence[str]):
        super().__init__()
        self.labels, self.names = labels, tuple(names)

    def encodes(self, i):
        return self.names[int(self.labels[int(i)])]


def labels_of(ds) -> np.ndarray:
    """int64 ``(N,)`` labels of a patch data set (its ``labels`` attribute, else read item by item)."""
    labels = getattr(ds, "labels", None)
    if labels is None:
        labels = [ds[i][1] for i in range(len(ds))]
    return np.asarray(labels, dtype=np.int64).reshape(-1)


@dataclass
class PatchData:
    """The torch datasets of each split and the fastai DataLoaders over them.

    ``dls.train`` / ``dls.valid`` follow fastai's conventions (train shuffled, dihedral
    augmentation; valid in dataset order); :meth:`dl` gives any split (test included) with the
    validation transforms. ``items[split]`` are the fastai item indices of a split.
    """

    dls: DataLoaders
    datasets: Mapping[str, torch.utils.data.Dataset]
    items: Mapping[str, range]
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def dl(self, split: str, **kwargs):
        if split == "train" and not kwargs:
            return self.dls.train
        if split == "valid" and not kwargs:
            return self.dls.valid
        if split not in self.items:
            raise ConfigError(f"no split {split!r}; have {sorted(self.items)}")
        return self.dls.test_dl(list(self.items[split]), with_labels=True, **kwargs)

    def labels(self, split: str) -> np.ndarray:
        return labels_of(self.datasets[split])

    def valid_inputs(self, patches_uint8: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """uint8 ``(N, 96, 96, 3)`` patches through the validation batch transforms (the model's input)."""
        x = TensorImage(torch.from_numpy(patches_uint8).permute(0, 3, 1, 2).contiguous().to(device))
        return self.dls.valid.after_batch(x)


def build_dataloaders(
    splits: Mapping[str, torch.utils.data.Dataset],
    *,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    augment: bool | str = True,
    class_names: Sequence[str] = CLASS_NAMES,
) -> PatchData:
    """fastai ``DataLoaders`` over torch datasets of ``(uint8 (96, 96, 3) patch, int label)``.

    Items become a uint8 ``TensorImage`` (CHW) and a ``TensorCategory`` (vocab ``class_names``
    in label order: index 1 = PCam label 1 = tumour). With ``+scanner``, training items first go
    through :class:`ScannerItem` (uint8, CPU, in the workers). Batch transforms run on ``device``:
    ``IntToFloatTensor`` (/255), the training augmentation ``augment`` (one of
    :data:`~patch_model.augment.AUGMENTS`: :class:`HedJitterBatch` for ``+hed``, then
    :class:`DihedralBatch` over the ``flips`` or all ``dihedral`` symmetries; ``True`` =
    ``"dihedral"``, ``False`` = ``"none"``), :class:`ResizeBatch` to ``size``,
    ``Normalize(mean, std)``; i.e. on validation batches, the inference ``Preprocess`` of
    ``pcam_config(input_size=size, mean=mean, std=std)``.
    """
    spec = parse_augment({True: "dihedral", False: "none"}.get(augment, augment))
    if "train" not in splits or "valid" not in splits:
        raise ConfigError(f"need 'train' and 'valid' splits; got {sorted(splits)}")
    order = ["train", "valid"] + sorted(s for s in splits if s not in ("train", "valid"))
    parts = [splits[s] for s in order]
    labels = np.concatenate([labels_of(ds) for ds in parts])
    bad = np.setdiff1d(np.unique(labels), np.arange(len(class_names)))
    if bad.size:
        raise ConfigError(
            f"labels must be in 0..{len(class_names) - 1} ({', '.join(class_names)}); found {bad.tolist()}")
    items, start = {}, 0
    for name, ds in zip(order, parts):
        items[name] = range(start, start + len(ds))
        start += len(ds)
    n_train = len(items["train"])
    if n_train < batch_size:
        raise ConfigError(f"the train split has {n_train} patches, fewer than one batch ({batch_size}); "
                          f"lower --batch-size")
    source = torch.utils.data.ConcatDataset(parts)
    dsets = Datasets(
        list(range(start)),
        tfms=[[_ReadPatch(source)], [_ReadLabel(labels, class_names), Categorize(vocab=list(class_names), sort=False)]],
        splits=[list(items["train"]), list(items["valid"])],
    )
    batch_tfms = [IntToFloatTensor()]
    if spec.hed:
        batch_tfms.append(HedJitterBatch())
    if spec.geometric != "none":
        batch_tfms.append(DihedralBatch(SYMMETRIES[spec.geometric]))
    batch_tfms += [ResizeBatch(size), Normalize.from_stats(list(mean), list(std), cuda=False)]
    dev = torch.device(device)
    item_tfms = [ScannerItem()] if spec.scanner else None
    dls = dsets.dataloaders(bs=batch_size, after_item=item_tfms, after_batch=batch_tfms, device=dev,
                            num_workers=int(workers), pin_memory=dev.type == "cuda")
    return PatchData(dls=dls, datasets=dict(zip(order, parts)), items=items, size=int(size),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
