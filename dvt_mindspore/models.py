"""Every registered model in MindSpore: this backend's builder of each model family, and the ways to get a model."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn
from mindspore.nn.utils import no_init_parameters
from tqdm import tqdm

from dvt_shared.models import ModelConfig, build, create, family_of, list_model_names

from .checkpoint import load_weights
from .convert import from_canonical
from .dvt import DVT
from .engine import AllExitLogits
from .vt import VTFPN, ResNet, VTResNet

BUILDERS = {"t2t_vit": DVT, "deit": DVT, "vt_resnet": VTResNet, "resnet": ResNet, "vt_fpn": VTFPN}


def build_model(config: ModelConfig) -> nn.Cell:
    """The MindSpore model `config` describes (DVT, VT-ResNet, ResNet or VT-FPN), freshly initialised."""
    return build(BUILDERS, config)


def create_model(
    name: str, num_classes: int | None = None, checkpoint_path: str | os.PathLike | None = None, **overrides
) -> nn.Cell:
    """The registered model `name` (`dvt_shared.models.create`); `checkpoint_path`: .safetensors, .ckpt."""
    return create(build_model, name, num_classes, checkpoint_path, load_weights, **overrides)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, all or those matching the shell-style `pattern` (e.g. "dvt_*")."""
    return list_model_names(pattern)


def inference_model(config: ModelConfig, tensors) -> nn.Cell:
    """The model `config` describes, holding the canonical `tensors`, for inference in graph mode.

    MindSpore fixes the execution mode per process, so this sets graph mode for the whole process. The
    parameters are not initialised first: the tensors overwrite every one (`from_canonical` checks that
    they all fit before it loads any), and initialising took 7 of the 7.5 s that dvt_t2t_vit_14 took to build.
    """
    ms.set_context(mode=ms.GRAPH_MODE)
    with no_init_parameters():
        model = build_model(config)
    model = from_canonical(model, tensors)
    model.set_train(False)
    return model


def tensor(images: np.ndarray) -> Tensor:
    """A NumPy batch as this backend's input."""
    return Tensor(images)


def count_parameters(model: nn.Cell) -> int:
    return sum(int(np.prod(p.shape)) for p in model.trainable_params())


def all_exit_logits(model: nn.Cell, images: np.ndarray, batch: int = 256, precision: str = "fp32") -> np.ndarray:
    """(exits, n, classes) float32 logits of every exit (one for a classifier) at `precision` ("fp32", or
    "fp16" as Ascend computes, for a DVT), in batches with a progress bar."""
    if precision != "fp32" and not family_of(model.config).cascade:
        raise ValueError(f"{model.config.name}: MindSpore runs {precision} for DVT cascades only")
    run = model.forward_exits if precision == "fp32" else AllExitLogits(model, precision)
    chunks = []
    for start in tqdm(range(0, len(images), batch), desc=f"MindSpore {precision}", unit="batch", leave=False):
        outputs = run(Tensor(images[start:start + batch]))
        chunks.append(np.stack([o.asnumpy().astype(np.float32) for o in outputs]))
    return np.concatenate(chunks, axis=1)
