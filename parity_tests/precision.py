"""Reduced precision against PyTorch fp32 on the same weights: per-exit logits and exit decisions.

Shared by `test_precision.py` (few images) and `benchmarks/precision_agreement.py` (the whole
Fashion-MNIST test set), so both measure the same thing against the bounds of `targets.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import dvt_torch
from dvt_cli import backends
from dvt_shared.error_bounds import DecisionAgreement
from dvt_shared.error_bounds import decision_agreement as shared_decision_agreement
from dvt_shared.exit_policy import MAX_SOFTMAX, confidences, exit_indices, softmax
from dvt_torch import DVT as TorchDVT
from parity_tests import harness
from parity_tests.targets import PrecisionTarget
from tests.backends import adapter


def reduced_logits(target: PrecisionTarget, model: TorchDVT, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """(exits, n, classes) float32 logits of `model`'s weights run by the target's backend at its precision."""
    return backends.load(target.backend).all_exit_logits(
        adapter(target.backend).twin(model), x, batch, target.precision)


def fp32_logits(model: TorchDVT, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return dvt_torch.all_exit_logits(model, x, batch)


@dataclass(frozen=True)
class ExitAgreement:
    """Exit k of a reduced-precision run against fp32."""

    max_delta: float  # max |d logit|
    bound: float  # the target's logit bound for it
    factor: float  # max_delta in units of u * sqrt(blocks) * max(1, logit scale): compare with target.errors.factor

    @property
    def ok(self) -> bool:
        return self.max_delta <= self.bound


def logit_agreement(
    target: PrecisionTarget, reference: np.ndarray, reduced: np.ndarray, depth: int
) -> list[ExitAgreement]:
    rows = []
    for k, (ref, got) in enumerate(zip(reference, reduced)):
        blocks, scale = depth * (k + 1), float(np.abs(ref).max())
        delta = harness.max_abs_delta(got, ref)
        rows.append(ExitAgreement(delta, target.errors.bound(blocks, scale), target.errors.units(delta, blocks, scale)))
    return rows


def decision_agreement(
    target: PrecisionTarget, reference: np.ndarray, reduced: np.ndarray, thresholds, agreements: list[ExitAgreement]
) -> DecisionAgreement:
    """Exits chosen at both precisions with the same thresholds; margins from each exit's logit bound."""
    ref_conf, got_conf = confidences(softmax(reference)), confidences(softmax(reduced))
    margins = MAX_SOFTMAX.margin([a.bound for a in agreements])
    return shared_decision_agreement(ref_conf, exit_indices(got_conf, thresholds), thresholds, margins, got_conf)
