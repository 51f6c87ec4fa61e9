"""Starting a training run from trained weights: `dvt train --init-weights PATH`.

Any weight file the project reads: canonical `.safetensors` (its config travels with it), a
release `.pth` / `.pth.tar` or a MindSpore `.ckpt` (the model named by `--model`). Every tensor
whose key and shape fit the new model is loaded; the classifier heads, sized for the new data's
classes, start afresh; a learned position embedding of another token grid (another image size) is
interpolated, as timm does when it fine-tunes a ViT at another resolution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dvt_shared.models import ModelConfig
from dvt_shared.weight_format import load_canonical, weight_format

# Parameters of the classifier heads: replaced when the class count changes, scaled by --head-lr-scale.
HEAD_KEYS = ("head.", "fc.", "classifier.")


@dataclass
class InitWeights:
    """What a weight file holds for initialisation: its tensors by key and, when it records it, its config."""

    path: str
    tensors: dict[str, np.ndarray]
    config: ModelConfig | None


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # the new model's, not taken from the file
    interpolated: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # the file's, which the new model has no place for

    def summary(self, path: str) -> str:
        lines = [f"initialised from {path}: {len(self.loaded)} tensors loaded, {len(self.interpolated)} interpolated, "
                 f"{len(self.reinitialised)} re-initialised, {len(self.ignored)} ignored"]
        for label, keys in (("interpolated", self.interpolated), ("re-initialised", self.reinitialised),
                            ("ignored", self.ignored)):
            if keys:
                lines.append(f"  {label}: {', '.join(keys)}")
        return "\n".join(lines)


def read_init_weights(path: str) -> InitWeights:
    """The tensors (and config, where recorded) of any weight format the project reads."""
    if os.path.isdir(path):
        raise ValueError(f"--init-weights {path} is a directory, not a weight file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-weights {path} does not exist")
    kind = weight_format(path)
    if kind == "safetensors":
        tensors, metadata = load_canonical(path)
        return InitWeights(path, tensors, metadata.config)
    if kind == "pth":
        from .checkpoint import read_release_checkpoint

        return InitWeights(path, read_release_checkpoint(path).state_dict, None)
    try:
        from dvt_mindspore.checkpoint import load_ckpt
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"--init-weights {path}: reading a MindSpore .ckpt needs MindSpore ({exc.name} is missing)"
        ) from exc
    return InitWeights(path, load_ckpt(path), None)


def recorded_config(init: InitWeights, model: str, model_given: bool, num_classes: int) -> ModelConfig:
    """The config a file records, its class count replaced by the data's (a file that records none is
    read as the registered --model)."""
    if model_given and model != init.config.name:
        raise ValueError(f"--init-weights {init.path} holds a {init.config.name} model, but --model {model} was given")
    return init.config.replace(num_classes=num_classes)


def _interpolated_pos_embed(stored: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (1, 1 + s*s, D) learned position embedding moved to (1, 1 + t*t, D): bicubic on the grid, the
    class token's row kept (timm's resample_abs_pos_embed)."""
    from timm.layers import resample_abs_pos_embed

    side = int(round((shape[1] - 1) ** 0.5))
    return resample_abs_pos_embed(stored, new_size=(side, side), num_prefix_tokens=1)


def load_init_weights(model: nn.Module, init: InitWeights) -> InitReport:
    """Load what fits of `init` into `model` (in place) and say what was loaded, interpolated and left."""
    report = InitReport()
    state = model.state_dict()
    updates = {}
    for key, target in state.items():
        if key not in init.tensors:
            report.reinitialised.append(key)
            continue
        stored = torch.from_numpy(np.asarray(init.tensors[key])).to(target.dtype)
        if stored.shape == target.shape:
            updates[key] = stored
            report.loaded.append(key)
        elif key.endswith("pos_embed") and stored.ndim == target.ndim == 3 and stored.shape[2] == target.shape[2]:
            updates[key] = _interpolated_pos_embed(stored, target.shape)
            report.interpolated.append(key)
        elif is_head(key):
            report.reinitialised.append(key)
        else:
            raise ValueError(
                f"--init-weights {init.path}: {key} has shape {tuple(stored.shape)}, the model needs "
                f"{tuple(target.shape)}; only the heads and learned position embeddings may differ"
            )
    report.ignored = sorted(set(init.tensors) - set(state))
    model.load_state_dict({**state, **updates}, strict=True)
    return report


def is_head(name: str) -> bool:
    return name.startswith(HEAD_KEYS) or any(f".{head}" in name for head in HEAD_KEYS)


def freeze_stages(model: nn.Module, count: int) -> list[str]:
    """Freeze the first `count` stages of a DVT cascade (their parameters stop training); their names."""
    num_exits = getattr(model, "num_exits", 1)
    if not 0 <= count < num_exits or not hasattr(model, "stage"):
        raise ValueError(f"--freeze-stages {count}: {model.config.name} has {num_exits} stage(s); at most "
                         f"{num_exits - 1} can be frozen, the last one always trains")
    frozen = []
    for index in range(count):
        for name, param in model.stage(index).named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{model.stage_names[index]}.{name}")
    return frozen


def head_lr_groups(groups: list[dict], model: nn.Module, scale: float) -> list[dict]:
    """timm's weight-decay parameter groups split into head and body, the heads' learning rate times `scale`
    (timm's schedulers honour a group's `lr_scale`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        heads = [p for p in group["params"] if is_head(names[id(p)])]
        body = [p for p in group["params"] if not is_head(names[id(p)])]
        for params, lr_scale in ((body, 1.0), (heads, scale)):
            if params:
                out.append({**group, "params": params, "lr_scale": lr_scale})
    return out
