"""Twin models of a (reference, candidate) pair of backends, run side by side, and where they part.

The pairs come from the one backend table (`dvt_cli.backends.parity_pairs`): every backend that runs
models, against the reference (PyTorch, whose float64 run is proven against the release's). A model
is built in the reference backend (seeded random weights, or the release fixtures' weights) and its
twin in the candidate through the canonical tensors. When outputs differ, `first_divergence` reruns
both with hooks on the stems, relation convs, blocks, final norms and heads, and names the first
that differs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dvt_cli.backends import BACKENDS, REFERENCE, parity_pairs
from dvt_shared.configs import DVTConfig
from dvt_shared.models import get_model_config, list_model_names
from dvt_torch import DVT as TorchDVT
from dvt_torch.convert import from_canonical as torch_from_canonical
from tests.backends import adapter
from tests.release_fixtures import CASCADES, cascade_config, release_npz

# Modules whose outputs are compared, in the order they run inside a stage.
TRACED = re.compile(r"^[^.]+\.(tokens_to_token|patch_embed|relation_reuse_conv|blocks\.\d+|norm|head)$")


def forward_exits(model, x):
    return model.forward_exits(x)


@dataclass(frozen=True)
class Side:
    """One backend of a pair, on one device (its framework's name for it)."""

    backend: str
    device: str

    @property
    def adapter(self):
        return adapter(self.backend)

    def twin(self, reference_model):
        """This backend's model holding the reference model's weights (the reference's: the model itself)."""
        return self.adapter.twin(reference_model)

    def apply(self, model, fn, x: np.ndarray):
        return self.adapter.apply(model, fn, x, self.device)

    def exits(self, model, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits, as NumPy arrays."""
        return self.apply(model, forward_exits, x)


@dataclass(frozen=True)
class Pair:
    reference: str
    candidate: str

    @property
    def id(self) -> str:
        return f"{self.reference}-{self.candidate}"

    def on(self, target) -> tuple[Side, Side]:
        """Both sides on `target`'s hardware, activated; the calling test is skipped (with the reason) where
        a side's backend does not run on that hardware or its device is absent."""
        sides = []
        for backend, kind in ((self.reference, target.reference_on), (self.candidate, target.candidate_on)):
            device = BACKENDS[backend].devices.get(kind)
            if device is None:
                pytest.skip(f"{backend} does not run on {kind}")
            reason = adapter(backend).device_missing(device)
            if reason:
                pytest.skip(reason)
            sides.append(Side(backend, device))
        for side in sides:
            side.adapter.activate(side.device)
        return sides[0], sides[1]


PAIRS = tuple(Pair(*pair) for pair in parity_pairs())
PAIR_PARAMS = [pytest.param(pair, id=pair.id) for pair in PAIRS]


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
        return get_model_config(self.name, **overrides)


def cases() -> list[Case]:
    return [Case(name) for name in list_model_names(cascade=True)] + [Case(name, fixture=True) for name in CASCADES]


def fixture_io(name: str) -> dict[str, np.ndarray]:
    return release_npz(f"{name}_io.npz")


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add seeded noise to every trainable parameter so zero biases and unit norms matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def reference_model(case: Case, seed: int = 0, noise: float = 0.02, **overrides) -> TorchDVT:
    """The case's model in the reference backend, eval mode, on the CPU; random weights get `noise` added."""
    assert REFERENCE == "torch", "models are drawn with PyTorch's generator; another reference needs its own"
    config = case.config(**overrides)
    torch.manual_seed(seed)
    model = TorchDVT(config)
    if case.fixture:
        weights = release_npz(f"{case.name}_weights.npz")
        torch_from_canonical(model, weights, source=f"{case.name}_weights.npz")
    else:
        perturb(model, seed, noise)
    return model.eval()


def images(config: DVTConfig, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, config.in_chans, config.img_size, config.img_size)).astype(np.float32)


def labelled(traced: list[tuple[str, list]]) -> list[tuple[str, np.ndarray]]:
    """(label, array) of every traced output: a block's (tokens, attention logits) are labelled apart."""
    out = []
    for name, outputs in traced:
        if len(outputs) == 2:
            out += [(f"{name} {label}", part) for label, part in zip(("tokens", "attention logits"), outputs)]
        else:
            out += [(name, part) for part in outputs]
    return out


def first_divergence(
    reference: Side, candidate: Side, reference_model, candidate_model, x: np.ndarray, tolerance: float,
    pattern=TRACED, fn=forward_exits,
) -> str:
    """The first traced output, in execution order, whose max |delta| exceeds `tolerance`."""
    theirs = labelled(reference.adapter.trace(reference_model, fn, x, pattern, reference.device))
    ours = dict(labelled(candidate.adapter.trace(candidate_model, fn, x, pattern, candidate.device)))
    for name, expected in theirs:
        if name not in ours:
            return f"{name} ran in {reference.backend} but not in {candidate.backend}"
        got = ours[name]
        if got.shape != expected.shape:
            return f"{name}: shape {expected.shape} in {reference.backend} vs {got.shape} in {candidate.backend}"
        delta = max_abs_delta(got, expected)
        if not delta <= tolerance:
            return f"{name} (max |delta| {delta:.3e})"
    return "no traced layer exceeds the tolerance (the difference arises between traced layers)"


def max_abs_delta(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def worst_sample(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the sample (leading axis) with the largest |delta|."""
    per_sample = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(a.shape[0], -1).max(axis=1)
    return int(per_sample.argmax())
