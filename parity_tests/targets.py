"""Where the parity checks run, and the error model each is held to (dvt_shared.error_bounds).

A target names the hardware each side of a (reference, candidate) pair runs on ("cpu", "gpu",
"ascend"); each backend's own device name for it comes from the one backend table
(`dvt_cli.backends.BACKENDS[...].devices`). CPU is always present; the accelerators are pytest
parameters that skip with the reason when absent. MindSpore fixes its device when its runtime
starts, once per process, so an accelerator target runs only in a process whose MindSpore has not
yet run on the CPU: `pytest parity_tests -k gpu`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from dvt_shared.error_bounds import ASCEND_CUBE, BF16, FP16, FP16_AUTOCAST, FP32, ErrorModel


@dataclass(frozen=True)
class Target:
    name: str
    reference_on: str  # hardware kind the reference backend runs on
    candidate_on: str  # and the candidate
    # how far the backends' outputs may drift here: bounds derived in dvt_shared.error_bounds
    errors: ErrorModel
    # share of all samples whose confidence may lie within the decision margin of a threshold
    max_borderline_share: float = 0.001

    def logit_bound(self, blocks: int, reference) -> float:
        """Bound on |d output| of outputs that passed `blocks` blocks, scaled by the reference outputs."""
        return self.errors.bound(blocks, float(np.abs(np.asarray(reference)).max()))

    def step_bound(self, blocks: int, learning_rate: float, largest_update: float) -> float:
        """Bound on |d weight| after one SGD step: learning rate x the gradients' bound, the gradients
        having passed every block forward and back (2 x blocks), scaled by the largest gradient."""
        return learning_rate * self.errors.bound(2 * blocks, largest_update / learning_rate)


# fp32 on both sides: other kernels, other summation orders (TF32 is switched off on CUDA).
CPU = Target("cpu", "cpu", "cpu", FP32)
GPU = Target("gpu", "gpu", "gpu", FP32)
# Ascend's Cube unit multiplies in fp16 even for fp32 tensors (the reference stays on the CPU).
ASCEND = Target("ascend", "cpu", "ascend", ASCEND_CUBE, max_borderline_share=0.01)

TARGETS = (CPU, GPU, ASCEND)
TARGET_PARAMS = [pytest.param(target, id=target.name) for target in TARGETS]


@dataclass(frozen=True)
class PrecisionTarget:
    """A reduced-precision run held against PyTorch fp32 on the same weights, on this CPU.

    Logit bound and decision margin: `errors` (dvt_shared.error_bounds, where the form is derived).
    The factors hold 1.4-2.4x headroom over the largest factor observed on the seeded release-size
    configs and on all 10,000 Fashion-MNIST test images through the shipped models (fp16: 0.90 and
    1.42 for the 4- and 60-epoch weights, bf16: 2.33 and 1.65; README, "Reduced precision").

    How many samples lie within the margin of a threshold depends on the model, not on the precision:
    a model trained with label smoothing puts most confidences near 0.9, where its thresholds also
    lie. So what is bounded is the share of samples that really leave at another exit
    (max_changed_share, a few times the rate measured on all 10,000 test images).
    """

    name: str
    backend: str  # the backend running reduced precision, by its name in dvt_cli.backends.BACKENDS
    precision: str
    errors: ErrorModel
    max_changed_share: float

    def activate(self) -> None:
        """Put the target's backend on the CPU, where its reduced precision runs here."""
        from dvt_cli.backends import BACKENDS
        from tests.backends import adapter

        adapter(self.backend).activate(BACKENDS[self.backend].devices["cpu"])


# MindSpore on this CPU, computing as Ascend does: fp16 matmuls and convolutions (u = 2^-11),
# norms, softmax and reductions in fp32.
ASCEND_FP16 = PrecisionTarget("ascend-fp16", "mindspore", "fp16", FP16, max_changed_share=0.01)
# PyTorch autocast bfloat16 (u = 2^-8: 8 mantissa bits), against PyTorch fp32.
BF16_TARGET = PrecisionTarget("bf16", "torch", "bf16", BF16, max_changed_share=0.03)
# PyTorch autocast float16 (u = 2^-11), as CUDA users train and serve, here through the CPU's fp16 autocast:
# matmuls in fp16 and their outputs kept in fp16 (unlike ascend-fp16), the T2T performer in float32.
TORCH_FP16 = PrecisionTarget("fp16", "torch", "fp16", FP16_AUTOCAST, max_changed_share=0.01)

PRECISION_TARGETS = (ASCEND_FP16, BF16_TARGET, TORCH_FP16)
PRECISION_TARGET_PARAMS = [pytest.param(target, id=target.name) for target in PRECISION_TARGETS]
