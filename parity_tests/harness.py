"""Building twin models in both backends, running them, and locating where they part.

A PyTorch model is built (seeded random weights, or the release fixtures' weights),
converted through the canonical tensors, and loaded into a MindSpore model of the same
config. When outputs differ, `first_divergence` reruns both with hooks on the stems,
relation convs, blocks, final norms and heads, and names the first that differs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

import mindspore as ms
from dvt_shared.configs import DVTConfig, get_config, list_configs
from dvt_mindspore import DVT as MsDVT
from dvt_mindspore.convert import from_canonical as ms_from_canonical
from dvt_torch import DVT as TorchDVT
from dvt_torch.convert import from_canonical as torch_from_canonical
from dvt_torch.convert import to_canonical as torch_to_canonical
from tests.release_fixtures import CASCADES, cascade_config, release_npz

# Modules whose outputs are compared, in the order they run inside a stage.
TRACED = re.compile(r"^[^.]+\.(tokens_to_token|patch_embed|relation_reuse_conv|blocks\.\d+|norm|head)$")


@dataclass(frozen=True)
class Case:
    """One model to compare: a registered config or a release fixture."""

    name: str
    fixture: bool = False

    @property
    def release_size(self) -> bool:
        # The ImageNet geometry of the release; fixtures are small cascades on it.
        return not self.fixture and self.config().img_size >= 224

    @property
    def batch(self) -> int:
        return 2 if self.release_size else 4

    def config(self, **overrides) -> DVTConfig:
        if self.fixture:
            return cascade_config(self.name).replace(**overrides)
        return get_config(self.name, **overrides)


def cases() -> list[Case]:
    return [Case(name) for name in list_configs()] + [Case(name, fixture=True) for name in CASCADES]


def fixture_io(name: str) -> dict[str, np.ndarray]:
    return release_npz(f"{name}_io.npz")


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add seeded noise to every trainable parameter so zero biases and unit norms matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def torch_model(case: Case, seed: int = 0, noise: float = 0.02, **overrides) -> TorchDVT:
    """The case's PyTorch model in eval mode, on the CPU; random weights get `noise` added."""
    config = case.config(**overrides)
    torch.manual_seed(seed)
    model = TorchDVT(config)
    if case.fixture:
        weights = release_npz(f"{case.name}_weights.npz")
        torch_from_canonical(model, weights, source=f"{case.name}_weights.npz")
    else:
        perturb(model, seed, noise)
    return model.eval()


def mindspore_twin(model: TorchDVT) -> MsDVT:
    """A MindSpore model of the same config holding the same weights, via the canonical tensors."""
    twin = MsDVT(model.config)
    ms_from_canonical(twin, torch_to_canonical(model), source="the PyTorch model's weights")
    twin.set_train(model.training)
    return twin


def images(config: DVTConfig, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, config.in_chans, config.img_size, config.img_size)).astype(np.float32)


def torch_outputs(model: TorchDVT, x: np.ndarray, device: str = "cpu") -> list[np.ndarray]:
    model = model.to(device)
    with torch.no_grad():
        outputs = model.forward_exits(torch.from_numpy(x).to(device))
    model.to("cpu")
    return [o.cpu().numpy() for o in outputs]


def mindspore_outputs(model: MsDVT, x: np.ndarray) -> list[np.ndarray]:
    return [o.asnumpy() for o in model.forward_exits(ms.Tensor(x))]


def _named_outputs(name: str, output) -> list[tuple[str, np.ndarray]]:
    if isinstance(output, (tuple, list)):
        # A block returns (tokens, attention logits).
        labels = ("tokens", "attention logits")
        return [(f"{name} {label}", part) for label, part in zip(labels, output)]
    return [(name, output)]


def trace_torch(model: TorchDVT, x: np.ndarray, device: str = "cpu") -> list[tuple[str, np.ndarray]]:
    """Outputs of the traced modules, in the order they ran."""
    records: list[tuple[str, object]] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: records.append((name, out)))
        for name, module in model.named_modules()
        if TRACED.match(name)
    ]
    try:
        torch_outputs(model, x, device)
    finally:
        for handle in handles:
            handle.remove()
    traced = []
    for name, output in records:
        traced += [(label, t.detach().cpu().numpy()) for label, t in _named_outputs(name, output)]
    return traced


def trace_mindspore(model: MsDVT, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of the traced cells by name (hooks run in PyNative mode only)."""
    records: list[tuple[str, object]] = []
    handles = [
        cell.register_forward_hook(lambda _c, _i, out, name=name: records.append((name, out)))
        for name, cell in model.cells_and_names()
        if TRACED.match(name)
    ]
    try:
        mindspore_outputs(model, x)
    finally:
        for handle in handles:
            handle.remove()
    traced = {}
    for name, output in records:
        traced.update({label: t.asnumpy() for label, t in _named_outputs(name, output)})
    return traced


def first_divergence(
    torch_model: TorchDVT, ms_model: MsDVT, x: np.ndarray, tolerance: float, device: str = "cpu"
) -> str:
    """The first traced output, in execution order, whose max |delta| exceeds `tolerance`."""
    ms_records = trace_mindspore(ms_model, x)
    for name, reference in trace_torch(torch_model, x, device):
        if name not in ms_records:
            return f"{name} ran in PyTorch but not in MindSpore"
        other = ms_records[name]
        if other.shape != reference.shape:
            return f"{name}: shape {reference.shape} in PyTorch vs {other.shape} in MindSpore"
        delta = float(np.abs(other.astype(np.float64) - reference).max())
        if not delta <= tolerance:
            return f"{name} (max |delta| {delta:.3e})"
    return "no traced layer exceeds the tolerance (the difference arises between traced layers)"


def max_abs_delta(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def worst_sample(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the sample (leading axis) with the largest |delta|."""
    per_sample = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(a.shape[0], -1).max(axis=1)
    return int(per_sample.argmax())
