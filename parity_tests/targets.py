"""Where the parity checks run, and every tolerance they use, in one place.

A target pairs a PyTorch device with a MindSpore device. CPU is always present; the
accelerators are pytest parameters that skip with the reason when absent. MindSpore fixes
its device when its runtime starts, once per process, so an accelerator target runs only
in a process whose MindSpore has not yet run on the CPU: `pytest parity_tests -k gpu`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Target:
    name: str
    torch_device: str
    mindspore_device: str
    # max |d logit| between the backends: small configs and release fixtures / release-size configs
    logits_small: float
    logits_release: float
    # max |d weight| after one identical optimizer step
    train_step: float
    # confidences this close to a threshold may route either way: counted, not failed
    decision_margin: float
    # share of all samples that may be that close
    max_borderline_share: float = 0.001

    def logits_tolerance(self, release_size: bool) -> float:
        return self.logits_release if release_size else self.logits_small

    def missing(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.torch_device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device for PyTorch on this machine"
        if self.mindspore_device == "Ascend" and not (os.environ.get("ASCEND_HOME_PATH") or shutil.which("npu-smi")):
            return "no Ascend toolkit (ASCEND_HOME_PATH, npu-smi) on this machine"
        if self.mindspore_device != "CPU":
            import mindspore.hal

            if not mindspore.hal.is_available(self.mindspore_device):
                return f"this MindSpore build cannot run on {self.mindspore_device}"
        return None

    def activate(self) -> None:
        """Put both frameworks on this target, or skip the calling test with the reason."""
        reason = self.missing()
        if reason:
            pytest.skip(reason)
        import mindspore as ms
        import mindspore.hal

        current = ms.get_context("device_target")
        if current != self.mindspore_device:
            if mindspore.hal.is_initialized(current):
                pytest.skip(
                    f"MindSpore already runs on {current} in this process and cannot move; "
                    f"run `pytest parity_tests -k {self.name}` on its own"
                )
            ms.set_device(self.mindspore_device)
        if self.torch_device == "cuda":
            import torch

            # TF32 would round matmul inputs to 10 mantissa bits; parity is measured in fp32.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False


CPU = Target("cpu", "cpu", "CPU", logits_small=1e-5, logits_release=1e-4, train_step=1e-5, decision_margin=1e-5)
# Different kernels (cuBLAS vs MindSpore's GPU ops) reorder fp32 sums: one decade looser.
GPU = Target("gpu", "cuda", "GPU", logits_small=1e-4, logits_release=1e-3, train_step=1e-4, decision_margin=1e-4)
# Ascend's cube unit multiplies in fp16 even for fp32 tensors (PyTorch stays on the CPU as reference).
ASCEND = Target(
    "ascend", "cpu", "Ascend", logits_small=5e-2, logits_release=1e-1, train_step=1e-3, decision_margin=1e-2,
    max_borderline_share=0.01,
)

TARGETS = (CPU, GPU, ASCEND)
TARGET_PARAMS = [pytest.param(target, id=target.name) for target in TARGETS]


@dataclass(frozen=True)
class PrecisionTarget:
    """A reduced-precision run held against PyTorch fp32 on the same weights, on this CPU.

    Logit bound of exit k: |d logit| <= factor * u * sqrt(blocks_k) * max(1, max |logit_k|), with
    u the unit roundoff of the precision and blocks_k the transformer blocks exit k's logits pass
    through (stage k reads stages 0..k-1's tokens and relations, so depth * (k + 1)). Why that form:
    each matmul rounds its inputs (relative error <= u each, fp32 accumulation) and, where its output
    stays low-precision, its output (u more); rounding errors of independent blocks add like a random
    walk, sqrt(blocks); and they scale with the logits. `factor` holds the per-block constant (about
    4 roundings of 1-3 u each, amplified by the norms) with 1.4-2.4x headroom over the largest factor
    observed on the seeded release-size configs and on all 10,000 Fashion-MNIST test images through
    the shipped models (fp16: 0.90 and 1.42 for the 4- and 60-epoch weights, bf16: 2.33 and 1.65;
    README, "Reduced precision").

    Decisions: for softmax p, |dp_i| <= 2 p_i (1 - p_i) max|dz| <= max|dz| / 2, so a confidence
    moves by at most half the logit bound; a sample switches exits only if a threshold lies between
    its two confidences, and then the nearer one is within a quarter of the logit bound of it. So
    margin = bound / 4: samples that close to a threshold may route either way (counted); every other
    sample must exit identically. How many are that close depends on the model, not on the precision:
    a model trained with label smoothing puts most confidences near 0.9, where its thresholds also
    lie. So what is bounded is the share of samples that really leave at another exit
    (max_changed_share, a few times the rate measured on all 10,000 test images).
    """

    name: str
    backend: str  # the framework running reduced precision: "mindspore" or "torch"
    precision: str
    unit_roundoff: float
    factor: float
    max_changed_share: float

    def logit_bound(self, blocks: int, logit_scale: float) -> float:
        return self.factor * self.unit_roundoff * blocks**0.5 * max(1.0, logit_scale)

    def decision_margin(self, logit_bound: float) -> float:
        return logit_bound / 4


# MindSpore on this CPU, computing as Ascend does: fp16 matmuls and convolutions (u = 2^-11),
# norms, softmax and reductions in fp32.
ASCEND_FP16 = PrecisionTarget("ascend-fp16", "mindspore", "fp16", 2.0**-11, factor=2.0, max_changed_share=0.01)
# PyTorch autocast bfloat16 (u = 2^-8: 8 mantissa bits), against PyTorch fp32.
BF16 = PrecisionTarget("bf16", "torch", "bf16", 2.0**-8, factor=4.0, max_changed_share=0.03)

PRECISION_TARGETS = (ASCEND_FP16, BF16)
PRECISION_TARGET_PARAMS = [pytest.param(target, id=target.name) for target in PRECISION_TARGETS]
