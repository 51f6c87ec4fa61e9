"""Weight files for the `dvt` command, one pass: a file of any format the project reads -> its model config,
its tensors checked against that config's layout (no framework needed), its metadata; and back to a file.
The backend table says which backend reads and writes each checkpoint format."""
from __future__ import annotations

import os

import numpy as np

from dvt_shared.models import ModelConfig, get_model_config, list_model_names, model_gflops, state_layout
from dvt_shared.weight_format import FORMAT_HELP, WeightMetadata, check_state_dict, load_canonical, save_canonical
from dvt_shared.weight_format import weight_format as _weight_format

from . import backends
from .options import CommandError


def weight_format(path: str) -> str:
    """'pth', 'safetensors' or 'ckpt', from the file name of `path`."""
    try:
        return _weight_format(path)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _read(path: str, kind: str) -> tuple[dict[str, np.ndarray], WeightMetadata | None, list[float] | None]:
    """(tensors by release key, the canonical metadata or None, cumulative GMACs per exit or None)."""
    if not os.path.exists(path):
        raise CommandError(f"{path} does not exist")
    if kind == "safetensors":
        tensors, metadata = load_canonical(path)
        return tensors, metadata, metadata.exit_flops or None
    tensors, flops = backends.for_weights(kind).read_checkpoint(path)
    return tensors, None, flops


# Classifier weights: DVT stages' and VT-ResNet's `head`, a plain ResNet's `fc`, VT-FPN's 1x1 `classifier`.
_HEAD_MODULES = ("head", "fc", "classifier")


def _head_classes(tensors: dict[str, np.ndarray]) -> int | None:
    heads = [
        value.shape[0] for key, value in tensors.items()
        if key.endswith(".weight") and key[: -len(".weight")].rpartition(".")[2] in _HEAD_MODULES
        and value.ndim in (2, 4)
    ]
    return heads[0] if heads else None


def _resolve_config(
    src: str, model: str | None, num_classes: int | None, tensors: dict[str, np.ndarray], metadata
) -> ModelConfig:
    if metadata is not None:
        config = metadata.config
        if model is not None and model != config.name:
            raise CommandError(f"{src} holds a {config.name} model, but --model {model} was given")
        if num_classes is not None and num_classes != config.num_classes:
            raise CommandError(f"{src} holds {config.num_classes} classes, but --num-classes {num_classes} was given")
        return config
    if model is None:
        raise CommandError(f"{src} does not record its model: "
                           f"pass --model NAME (one of {', '.join(list_model_names())})")
    num_classes = num_classes if num_classes is not None else _head_classes(tensors)
    try:
        return get_model_config(model, num_classes=num_classes)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def read_weights(path: str, model: str | None = None, num_classes: int | None = None):
    """(config, checked tensors by release key, canonical metadata or None, cumulative GMACs or None) of any format."""
    # a folder is named as one before its name is read as a format
    if os.path.isdir(path):
        raise CommandError(f"{path} is a directory, not a weight file: pass one file ({FORMAT_HELP})")
    tensors, metadata, flops = _read(path, weight_format(path))
    config = _resolve_config(path, model, num_classes, tensors, metadata)
    return config, _checked(config, tensors, source=path), metadata, flops


def _checked(config: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The tensors, checked against the layout `config` describes (no framework needed), as float32 in its order."""
    layout = state_layout(config)
    check_state_dict(layout, tensors, source=source)
    return {key: np.asarray(tensors[key], dtype=np.float32) for key in layout}


def write_weights(path: str, kind: str, tensors: dict[str, np.ndarray], config: ModelConfig, metadata, flops) -> None:
    if kind == "safetensors":
        if metadata is None:
            metadata = WeightMetadata(config=config, exit_flops=flops or list(model_gflops(config)))
        save_canonical(path, tensors, metadata)
    else:
        backends.for_weights(kind).write_checkpoint(path, tensors, flops)
