"""Every registered model in PyTorch: this backend's builder of each model family, and the ways to get a model."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dvt_shared.models import ModelConfig, build, create, list_model_names

from .checkpoint import load_weights
from .convert import from_canonical
from .dvt import DVT
from .engine import autocast_for
from .vt import VTFPN, ResNet, VTResNet

BUILDERS = {"t2t_vit": DVT, "deit": DVT, "vt_resnet": VTResNet, "resnet": ResNet, "vt_fpn": VTFPN}


def build_model(config: ModelConfig) -> nn.Module:
    """The PyTorch model `config` describes (DVT, VT-ResNet, ResNet or VT-FPN), freshly initialised."""
    return build(BUILDERS, config)


def create_model(
    name: str, num_classes: int | None = None, checkpoint_path: str | os.PathLike | None = None, **overrides
) -> nn.Module:
    """The registered model `name` (`dvt_shared.models.create`); `checkpoint_path`: .safetensors, .pth, .pth.tar."""
    return create(build_model, name, num_classes, checkpoint_path, load_weights, **overrides)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, all or those matching the shell-style `pattern` (e.g. "dvt_*")."""
    return list_model_names(pattern)


def inference_model(config: ModelConfig, tensors) -> nn.Module:
    """The model `config` describes, holding the canonical `tensors`, in eval mode."""
    return from_canonical(build_model(config), tensors).eval()


def tensor(images: np.ndarray) -> torch.Tensor:
    """A NumPy batch as this backend's input (no copy)."""
    return torch.from_numpy(images)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def all_exit_logits(model: nn.Module, images: np.ndarray, batch: int = 256, precision: str = "fp32") -> np.ndarray:
    """(exits, n, classes) float32 logits of every exit (one for a classifier) at `precision` ("fp32" or
    "bf16" or "fp16" autocast), in batches with a progress bar."""
    chunks = []
    device = next(model.parameters()).device
    with torch.inference_mode(), autocast_for(device, precision):
        for start in tqdm(range(0, len(images), batch), desc=f"PyTorch {precision}", unit="batch", leave=False):
            outputs = model.forward_exits(torch.from_numpy(images[start:start + batch]).to(device))
            chunks.append(np.stack([o.float().cpu().numpy() for o in outputs]))
    return np.concatenate(chunks, axis=1)
