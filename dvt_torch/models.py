"""Every registered DVT and VT model by name, as timm and mindcv users expect:
`create_model(name, num_classes=..., checkpoint_path=...)` and `list_models()`."""
from __future__ import annotations

import fnmatch
import os

from torch import nn

from dvt_shared.models import get_model_config, list_model_names
from dvt_shared.weight_format import load_canonical

from .checkpoint import read_release_checkpoint
from .convert import from_canonical
from .vt import build_model


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names (DVT and VT), optionally filtered by a shell-style pattern such as "dvt_*"."""
    names = list_model_names()
    return [name for name in names if fnmatch.fnmatch(name, pattern)] if pattern else names


def read_weights(path: str | os.PathLike) -> dict:
    """Canonical tensors of a `.safetensors` file or of a release `.pth`/`.pth.tar` (read with weights_only)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_canonical(path)[0]
    if path.endswith((".pth", ".pth.tar", ".pt")):
        return read_release_checkpoint(path).state_dict
    raise ValueError(f"{path}: a PyTorch model loads .safetensors or release .pth/.pth.tar files")


def create_model(
    name: str, num_classes: int | None = None, checkpoint_path: str | os.PathLike | None = None, **overrides
) -> nn.Module:
    """The registered model `name` (its own class count unless `num_classes` overrides it; 0 removes
    the heads), fields overridden, holding the weights of `checkpoint_path` if given."""
    config = get_model_config(name, num_classes=num_classes or None, **overrides)
    model = build_model(config)
    if checkpoint_path is not None:
        from_canonical(model, read_weights(checkpoint_path), source=os.fspath(checkpoint_path))
    if num_classes == 0:
        model.reset_classifier(0)
    return model
