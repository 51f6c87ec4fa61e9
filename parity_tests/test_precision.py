"""Reduced precision on this CPU against PyTorch fp32: `ascend-fp16` (MindSpore, fp16 as Ascend runs
it) and `bf16` (PyTorch autocast). Bounds and their derivation: `dvt_shared.error_bounds`.

Seeded release-size configs (two images) and the shipped Fashion-MNIST model on test images
with its calibrated thresholds; the whole test set is measured by benchmarks/precision_agreement.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dvt_shared.datasets import load_fashion_mnist, normalise_fashion_mnist
from dvt_shared.error_bounds import computation_blocks
from dvt_shared.weight_format import load_canonical
from dvt_torch import DVT
from dvt_torch.convert import from_canonical
from parity_tests import harness
from parity_tests.precision import decision_agreement, fp32_logits, logit_agreement, reduced_logits
from parity_tests.report import record
from parity_tests.targets import CPU, PRECISION_TARGET_PARAMS

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "dvt_t2t_vit_fmnist.safetensors"
SHIPPED_IMAGES = 256
RELEASE = ["dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small"]
CASES = [pytest.param(harness.Case("dvt_t2t_vit_fmnist"), id="dvt_t2t_vit_fmnist")] + [
    pytest.param(harness.Case(name), id=name, marks=pytest.mark.slow) for name in RELEASE
]


def check_logits(target, case_name: str, model, reference, reduced) -> list:
    agreements = logit_agreement(target, reference, reduced, model.config.depth)
    for k, a in enumerate(agreements):
        record("precision logits", case_name, target.name, f"exit {k}",
               f"{a.max_delta:.2e} ({a.factor:.2f} u-units)", f"{a.bound:.1e}", a.ok)
    bad = [f"exit {k}: max |dlogit| {a.max_delta:.3e} > {a.bound:.2e}" for k, a in enumerate(agreements) if not a.ok]
    assert not bad, f"{case_name} at {target.precision}: " + "; ".join(bad)
    return agreements


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target", PRECISION_TARGET_PARAMS)
def test_reduced_precision_logits(target, case):
    target.activate()
    model = harness.reference_model(case)
    x = harness.images(model.config, case.batch, seed=1)
    reduced = reduced_logits(target, model, x)
    reference = fp32_logits(model, x)
    assert np.isfinite(reduced).all(), f"{case.name} at {target.precision} gives non-finite logits"
    agreements = check_logits(target, case.name, model, reference, reduced)
    # the reduced run really is reduced: it differs from fp32 by more than fp32's own reorderings may
    assert max(a.max_delta for a in agreements) > CPU.logit_bound(computation_blocks(model.config), reference[-1])


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is not present")
    try:
        data = load_fashion_mnist(None)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    tensors, meta = load_canonical(SHIPPED)
    model = from_canonical(DVT(meta.config), tensors).eval()
    rows = np.random.default_rng(0).permutation(len(data["test_images"]))[:SHIPPED_IMAGES]
    x = normalise_fashion_mnist(data["test_images"][rows])
    return model, x, meta.thresholds, fp32_logits(model, x)


@pytest.mark.parametrize("target", PRECISION_TARGET_PARAMS)
def test_shipped_model_logits_and_decisions(target, shipped):
    target.activate()
    model, x, thresholds, reference = shipped
    reduced = reduced_logits(target, model, x)
    agreements = check_logits(target, "shipped fmnist", model, reference, reduced)
    decisions = decision_agreement(target, reference, reduced, thresholds, agreements)
    changed_share = decisions.differ / decisions.samples
    ok = decisions.unexplained.size == 0 and changed_share <= target.max_changed_share
    record("precision decisions", "shipped fmnist", target.name, f"{decisions.samples} test images",
           f"{decisions.differ} differ, {decisions.borderline} borderline ({decisions.borderline_share:.2%}, "
           f"margin {decisions.margin:.1e})", f"0 non-borderline, <= {target.max_changed_share:.0%} differ", ok)
    assert decisions.unexplained.size == 0, (
        f"samples {decisions.unexplained[:10].tolist()} leave at another exit at {target.precision} although no "
        f"confidence is within {decisions.margin:.1e} of a threshold"
    )
    assert changed_share <= target.max_changed_share, (
        f"{decisions.differ} of {decisions.samples} samples leave at another exit at {target.precision}"
    )
