"""fastai, imported in one place: the names the training modules use.

fastai decorates functions with ``torch.jit.script`` at import, which newer torch answers with a
FutureWarning that is not ours; it is silenced here, once, for every module of the package.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    import fastai
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.core import Callback
    from fastai.callback.fp16 import MixedPrecision
    from fastai.callback.hook import hook_output
    from fastai.callback.schedule import valley  # also registers fit_one_cycle / lr_find
    from fastai.callback.tracker import SaveModelCallback, TrackerCallback
    from fastai.data.core import DataLoaders, Datasets
    from fastai.data.transforms import Categorize, IntToFloatTensor, Normalize
    from fastai.learner import Learner, Recorder
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import RocAucBinary, accuracy
    from fastai.torch_core import TensorImage, num_distrib, rank_distrib, set_seed
    from fastai.vision.augment import RandTransform  # also patches TensorImage.dihedral
    from fastai.vision.learner import create_body, model_meta, vision_learner

    try:  # fastai >= 2.8
        from fasttransform.transform import Transform
    except ImportError:  # pragma: no cover - fastai 2.7
        from fastcore.transform import Transform

__all__ = [
    "fastai", "Callback", "ChannelsLast", "MixedPrecision", "hook_output", "valley", "SaveModelCallback",
    "TrackerCallback",
    "DataLoaders", "Datasets", "Categorize", "IntToFloatTensor", "Normalize", "Learner", "Recorder",
    "CrossEntropyLossFlat", "RocAucBinary", "accuracy", "TensorImage", "num_distrib", "rank_distrib", "set_seed",
    "RandTransform", "create_body", "model_meta", "vision_learner", "Transform",
]
