"""How far two computations of the same logits may drift: one error model for every comparison.

Two runs of one function on the same weights and images (another batch size, another CPU's
kernels, another framework, an exported graph, a lower precision) differ only by rounding.
For the logits of a network that passes through `blocks` transformer (or residual) blocks:

    |d logit| <= factor * u * sqrt(blocks) * max(1, max |logit|)

u is the unit roundoff of the precision the runs differ in. Why this form: every product in a
block rounds its result (relative error <= u per rounding, both runs round differently); the
rounding errors of independent blocks add like a random walk, sqrt(blocks); and they scale with
the logits (max(1, ...) keeps near-zero logits from asking for exactness). `factor` holds the
per-block constant: a handful of products, each rounding its inputs (reduced precision) or
summing K terms in another order (fp32: a random walk of K roundings, sqrt(K) u), amplified by
the norms, the softmax and the T2T performer's exponentials. Each factor holds headroom over
the largest one measured on two kernel families (`ATEN_CPU_CAPABILITY=avx2` and the CPU's
widest, measured on an Intel Xeon), so that it is not one kernel family's observation:
fp32 needed up to 39.9 (test_engine's deliberately sharp tiny model, MindSpore against
PyTorch under AVX2 kernels; its large weights make the performer's exponents large) and up
to 17 on the release's cascades and the registered configs; 128 leaves 3.2x.

Decisions: for a softmax p, |dp_i| <= 2 p_i (1 - p_i) max|dz| <= max|dz| / 2, so a maximum
softmax probability moves by at most half the logit bound; a sample can leave at another exit
only if a threshold lies between its two confidences, within a quarter of the bound of one of
them. So the release's decision margin is bound / 4 (`ExitPolicy.margin`, which holds each
policy's own constant): samples that close to a threshold they meet may route either way
(counted, not failed); every other sample must exit identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exit_policy import exit_indices

# Unit roundoff: half the distance from 1 to the next number (2^-(mantissa bits + 1)).
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}


@dataclass(frozen=True)
class ErrorModel:
    """Bounds for two computations that differ by rounding at `precision`."""

    name: str
    precision: str
    factor: float

    @property
    def unit_roundoff(self) -> float:
        return UNIT_ROUNDOFF[self.precision]

    def bound(self, blocks: int, scale: float) -> float:
        """Largest |difference| of outputs that passed through `blocks` blocks and are of size `scale`."""
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")
        return self.factor * self.unit_roundoff * blocks**0.5 * max(1.0, float(scale))

    def units(self, delta: float, blocks: int, scale: float) -> float:
        """`delta` in units of the bound without its factor: the factor this comparison needed."""
        return float(delta) / (self.bound(blocks, scale) / self.factor)

    def exit_bounds(self, depth: int, reference) -> np.ndarray:
        """Per-exit bounds of a cascade whose stages have `depth` blocks each, from the reference logits
        (exits, n, classes): exit k's logits pass through stages 0..k, depth * (k + 1) blocks."""
        return np.array([self.bound(depth * (k + 1), np.abs(np.asarray(ref)).max()) for k, ref in enumerate(reference)])


def computation_blocks(config, exit_index: int = -1) -> int:
    """Blocks between the input and the outputs of exit `exit_index` (default: the last): a DVT's exit k
    reads stages 0..k, depth * (k + 1) transformer blocks; a VT or ResNet model its stem, every residual
    block, and its VT modules (VT-FPN: its FPN and one transformer over every level)."""
    trunk = getattr(config, "trunk", None)
    if trunk is None:
        exits = config.num_exits
        if not -exits <= exit_index < exits:
            raise IndexError(f"{config.name} has exits 0..{exits - 1}, got {exit_index}")
        return config.depth * (exit_index % exits + 1)
    return 1 + sum(trunk.layers) + getattr(config, "vt_modules", 2)


# Two fp32 computations: other summation orders (batch sizes, CPUs, kernels, frameworks, exported graphs).
FP32 = ErrorModel("fp32", "fp32", factor=128.0)
# Reduced precision held against fp32: matmul inputs rounded to fp16 or bf16, fp32 accumulation.
FP16 = ErrorModel("fp16", "fp16", factor=2.0)
# PyTorch's fp16 autocast against fp32: matmul outputs stay fp16, so the elementwise work after them rounds too.
FP16_AUTOCAST = ErrorModel("fp16-autocast", "fp16", factor=4.0)
BF16 = ErrorModel("bf16", "bf16", factor=4.0)
# A real Ascend device against PyTorch fp32 on the CPU: the Cube unit multiplies in fp16. Not yet run on
# the hardware: twice the factor of its emulation on this CPU (FP16).
ASCEND_CUBE = ErrorModel("ascend-cube", "fp16", factor=4.0)


@dataclass(frozen=True)
class DecisionAgreement:
    """Exits chosen from two runs' confidences with the same thresholds."""

    samples: int
    differ: int  # samples leaving at another exit
    borderline: int  # samples within the margin of a threshold they met on the way in either run
    unexplained: np.ndarray  # indices of samples that differ without being borderline
    margin: float  # the largest margin a gap was held to
    closest: float  # smallest gap between a confidence and a threshold it met

    @property
    def borderline_share(self) -> float:
        return self.borderline / self.samples


def decision_agreement(reference_conf, other_exit, thresholds, margins, other_conf=None) -> DecisionAgreement:
    """Compare another run's exits (n,) with the exits `thresholds` give the reference confidences (exits, n).

    `margins` is one decision margin per exit (or one for all), the exit policy's `ExitPolicy.margin`. With
    the other run's confidences at every exit (`other_conf`), a sample is borderline if either run's confidence
    at an exit it reached in either run lies within the margin of that exit's threshold. An engine that stops
    early knows only the confidence of the exit it left at: then the reference's confidence alone is held to
    twice the margin (the two lie within 2 x margin of each other, so a threshold between them is that close to
    the reference).
    """
    reference_conf = np.asarray(reference_conf, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    exits = len(thresholds)
    margins = np.broadcast_to(np.asarray(margins, dtype=np.float64), (exits,))[:-1, None]
    ref_exit, other_exit = exit_indices(reference_conf, thresholds), np.asarray(other_exit)
    passed = np.arange(exits - 1)[:, None] <= np.maximum(ref_exit, other_exit)[None]
    gap = np.abs(reference_conf[:-1] - thresholds[:-1, None])
    if other_conf is None:
        margins = 2 * margins
    else:
        gap = np.minimum(gap, np.abs(np.asarray(other_conf, dtype=np.float64)[:-1] - thresholds[:-1, None]))
    borderline = ((gap <= margins) & passed).any(axis=0)
    differ = ref_exit != other_exit
    closest = float(gap[passed].min()) if passed.any() else float("inf")
    return DecisionAgreement(
        len(ref_exit), int(differ.sum()), int(borderline.sum()), np.flatnonzero(differ & ~borderline),
        float(margins.max()) if margins.size else 0.0, closest,
    )
