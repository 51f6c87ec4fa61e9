"""Starting a training run from trained weights: `dvt train --init-weights PATH`.

Any weight file the project reads: canonical `.safetensors` (its config travels with it), a
release `.pth` / `.pth.tar`, or another backend's format (a MindSpore `.ckpt`) through the reader the
command passes (`dvt train` reads it through the backend table; the model named by `--model`). Every tensor
whose key and shape fit the new model is loaded; the classifier heads, sized for the new data's
classes, start afresh; a learned position embedding of another token grid (another image size) is
interpolated, as timm does when it fine-tunes a ViT at another resolution; the input layers of a grey
model are adapted to RGB images (their input channels tiled, input weights divided by three, so that a grey
image given as RGB computes what it did), as timm's `adapt_input_conv` adapts a first convolution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dvt_shared.data_config import DataConfig
from dvt_shared.models import ModelConfig
from dvt_shared.weight_format import FORMAT_NAMES, load_canonical, weight_format

# Parameters of the classifier heads: replaced when the class count changes, scaled by --head-lr-scale.
HEAD_KEYS = ("head.", "fc.", "classifier.")


@dataclass
class InitWeights:
    """What a weight file holds for initialisation: its tensors by key and, when it records it, its config."""

    path: str
    tensors: dict[str, np.ndarray]
    config: ModelConfig | None
    data_config: DataConfig | None = None  # the images and classes it was trained on, where it records them


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # the new model's, not taken from the file
    interpolated: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # input layers of a grey model adapted to RGB
    ignored: list[str] = field(default_factory=list)  # the file's, which the new model has no place for

    def summary(self, path: str) -> str:
        lines = [f"initialised from {path}: {len(self.loaded)} tensors loaded, {len(self.interpolated)} interpolated, "
                 f"{len(self.adapted)} adapted from grey to RGB, {len(self.reinitialised)} re-initialised, "
                 f"{len(self.ignored)} ignored"]
        for label, keys in (("interpolated", self.interpolated), ("adapted", self.adapted),
                            ("re-initialised", self.reinitialised), ("ignored", self.ignored)):
            if keys:
                lines.append(f"  {label}: {', '.join(keys)}")
        return "\n".join(lines)


def read_init_weights(path: str, read_checkpoint=None) -> InitWeights:
    """The tensors (and config, where recorded) of any weight format the project reads: canonical and release
    files here, another backend's format by `read_checkpoint(path)` -> tensors (this backend imports no other)."""
    if os.path.isdir(path):
        raise ValueError(f"--init-weights {path} is a directory, not a weight file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-weights {path} does not exist")
    kind = weight_format(path)
    if kind == "safetensors":
        tensors, metadata = load_canonical(path)
        return InitWeights(path, tensors, metadata.config, metadata.data_config)
    if kind == "pth":
        from .checkpoint import read_release_checkpoint

        return InitWeights(path, read_release_checkpoint(path).state_dict, None)
    if read_checkpoint is None:
        raise ValueError(f"--init-weights {path} is a {FORMAT_NAMES[kind]}: `dvt train` reads it, or convert it "
                         f"first (dvt convert {path} {os.path.splitext(path)[0]}.safetensors)")
    return InitWeights(path, read_checkpoint(path), None)


def recorded_config(init: InitWeights, model: str, model_given: bool, num_classes: int) -> ModelConfig:
    """The config a file records, its class count replaced by the data's (a file that records none is
    read as the registered --model)."""
    if model_given and model != init.config.name:
        raise ValueError(f"--init-weights {init.path} holds a {init.config.name} model, but --model {model} was given")
    return init.config.replace(num_classes=num_classes)


def _grey_to_rgb(stored: np.ndarray, shape: tuple[int, ...], channels: int) -> np.ndarray | None:
    """A grey model's input-side tensor for `channels` input channels, where `shape` is `stored`'s with one axis
    `channels` times as long: tiled along it (channel-major, as unfolded patches and convolutions lay them out),
    a weight (2-D or more) divided by `channels`. None where the shapes differ otherwise."""
    differ = [axis for axis, (a, b) in enumerate(zip(stored.shape, shape)) if a != b]
    if len(stored.shape) != len(shape) or len(differ) != 1 or shape[differ[0]] != channels * stored.shape[differ[0]]:
        return None
    reps = [1] * stored.ndim
    reps[differ[0]] = channels
    tiled = np.tile(stored, reps)
    return tiled / channels if stored.ndim >= 2 else tiled


def _interpolated_pos_embed(stored: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A (1, 1 + s*s, D) learned position embedding moved to (1, 1 + t*t, D): bicubic on the grid, the
    class token's row kept (timm's resample_abs_pos_embed)."""
    from timm.layers import resample_abs_pos_embed

    side = int(round((shape[1] - 1) ** 0.5))
    return resample_abs_pos_embed(stored, new_size=(side, side), num_prefix_tokens=1)


def load_init_weights(model: nn.Module, init: InitWeights, keep_heads: bool = True) -> InitReport:
    """Load what fits of `init` into `model` (in place) and say what was loaded, interpolated, adapted and left.
    `keep_heads=False` leaves the classifier heads as the model initialised them (other classes)."""
    report = InitReport()
    state = model.state_dict()
    updates = {}
    grey_to_rgb = init.config is not None and init.config.in_chans == 1 and model.config.in_chans == 3
    for key, target in state.items():
        if key not in init.tensors or (not keep_heads and is_head(key)):
            report.reinitialised.append(key)
            continue
        stored = torch.from_numpy(np.asarray(init.tensors[key])).to(target.dtype)
        adapted = _grey_to_rgb(stored.numpy(), tuple(target.shape), 3) if grey_to_rgb and not is_head(key) else None
        if stored.shape == target.shape:
            updates[key] = stored
            report.loaded.append(key)
        elif key.endswith("pos_embed") and stored.ndim == target.ndim == 3 and stored.shape[2] == target.shape[2]:
            updates[key] = _interpolated_pos_embed(stored, target.shape)
            report.interpolated.append(key)
        elif adapted is not None:
            updates[key] = torch.from_numpy(np.ascontiguousarray(adapted)).to(target.dtype)
            report.adapted.append(key)
        elif is_head(key):
            report.reinitialised.append(key)
        else:
            raise ValueError(
                f"--init-weights {init.path}: {key} has shape {tuple(stored.shape)}, the model needs "
                f"{tuple(target.shape)}; only the heads, learned position embeddings and a grey model's input layers "
                "(for RGB) may differ"
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
