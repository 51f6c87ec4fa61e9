"""With the same thresholds, every sample leaves the cascade at the same exit in both backends of a pair.

Thresholds come from an exit policy (the release's max-softmax, and the entropy policy; the
release's search with geometric shares) on a calibration set scored by PyTorch, and are applied
to a separate test set, as the release does with held-out data. Only samples whose confidence
lies within the target's margin of a threshold they meet on the way may route differently; they
are counted.
A backend with a graph mode (MindSpore) runs in it here, the mode a deployment would use.
"""
from __future__ import annotations

import numpy as np
import pytest

from dvt_shared.calibration import exit_shares, find_thresholds
from dvt_shared.error_bounds import decision_agreement
from dvt_shared.exit_policy import EXIT_POLICIES, MAX_SOFTMAX, exit_indices, softmax
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import TARGET_PARAMS

CASE = harness.Case("dvt_t2t_vit_fmnist")
# Multiples of CHUNK, so MindSpore's graph mode compiles one shape only.
CALIBRATION, TEST = 256, 768
CHUNK = 256
P = 1.5


def structured_noise(count: int, size: int, seed: int) -> np.ndarray:
    """Images with some structure: smooth random blobs plus stripes plus pixel noise, one channel."""
    rng = np.random.default_rng(seed)
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    centre = rng.uniform(-0.7, 0.7, (count, 2, 1, 1)).astype(np.float32)
    width = rng.uniform(0.15, 0.6, (count, 1, 1)).astype(np.float32)
    blob = np.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / (2 * width**2))
    frequency = rng.uniform(1.0, 6.0, (count, 1, 1)).astype(np.float32)
    angle = rng.uniform(0.0, np.pi, (count, 1, 1)).astype(np.float32)
    stripes = np.sin(frequency * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy))
    pixels = 0.3 * rng.standard_normal((count, size, size)).astype(np.float32)
    return (2.0 * blob + 0.5 * stripes + pixels).astype(np.float32)[:, None]


def exit_logits(run, x: np.ndarray) -> np.ndarray:
    """(exits, samples, classes) logits, computed chunk by chunk."""
    chunks = [np.stack(run(x[start:start + CHUNK])) for start in range(0, len(x), CHUNK)]
    return np.concatenate(chunks, axis=1).astype(np.float32)


_scored: dict = {}


def scored(target, pair):
    """The pair's models and exit logits (reference on the calibration set; both on the test set), which
    every policy decides on: computed once per process."""
    key = (target.name, pair.id)
    if key in _scored:
        return _scored[key]
    ref, cand = pair.on(target)
    # Strong noise makes the random model's confidences depend on the image and spread out; with
    # the narrow spread of a freshly initialised model, many would crowd each threshold.
    ref_model = harness.reference_model(CASE, seed=5, noise=0.1)
    cand_model = cand.twin(ref_model)
    size = ref_model.config.img_size
    calibration = exit_logits(lambda x: ref.exits(ref_model, x), structured_noise(CALIBRATION, size, seed=11))
    test = structured_noise(TEST, size, seed=12)
    ref_logits = exit_logits(lambda x: ref.exits(ref_model, x), test)
    modes = cand.adapter.modes
    cand.adapter.mode("graph" if "graph" in modes else modes[0])
    try:
        cand_logits = exit_logits(lambda x: cand.exits(cand_model, x), test)
    finally:
        cand.adapter.mode(modes[0])  # hooks (first_divergence) run in the first mode
    _scored[key] = ref_model, cand_model, calibration, test, ref_logits, cand_logits
    return _scored[key]


@pytest.mark.parametrize("policy", EXIT_POLICIES.values(), ids=EXIT_POLICIES)
@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_same_exit_for_every_sample(target, pair, policy):
    ref, cand = pair.on(target)
    ref_model, cand_model, calibration, test, ref_logits, cand_logits = scored(target, pair)
    thresholds = find_thresholds(softmax(calibration), exit_shares(P, ref_model.num_exits), policy)
    ref_conf, cand_conf = policy.scores(softmax(ref_logits)), policy.scores(softmax(cand_logits))
    ref_exit, cand_exit = exit_indices(ref_conf, thresholds), exit_indices(cand_conf, thresholds)

    # margins from each exit's logit bound (dvt_shared.error_bounds), the logits scaled by PyTorch's
    bounds = target.errors.exit_bounds(ref_model.config.depth, ref_logits)
    margins = policy.margin(bounds)
    agreement = decision_agreement(ref_conf, cand_exit, thresholds, margins, cand_conf)
    share = agreement.borderline_share
    conf_delta = np.abs(cand_conf - ref_conf).max(axis=1)
    counts = np.bincount(ref_exit, minlength=ref_model.num_exits).tolist()
    # a confidence moves by at most the policy's Lipschitz constant times its logits' bound
    conf_ok = bool((conf_delta <= policy.lipschitz * bounds).all())
    # the target's share is set for the release's margin; a policy with a wider margin (a larger Lipschitz
    # constant) has proportionally more samples within it, for confidences spread smoothly around a threshold
    max_share = target.max_borderline_share * policy.lipschitz / MAX_SOFTMAX.lipschitz
    ok = agreement.unexplained.size == 0 and share < max_share and conf_ok
    record(
        f"decisions {pair.id}, {policy.name}", CASE.name, target.name, f"{TEST} samples, exits {counts}",
        f"{agreement.differ} differ, {agreement.borderline} borderline (margin {agreement.margin:.1e}), "
        f"max |dconf| {conf_delta.max():.1e}, closest to a threshold {agreement.closest:.1e}",
        f"0 non-borderline, < {max_share:.1%}", ok,
    )
    assert conf_ok, (
        f"{policy.name} confidences differ by up to {conf_delta} per exit, more than {policy.lipschitz} x the logit "
        f"bounds {bounds}"
    )
    assert min(counts) > 0, (
        f"thresholds {thresholds} route no sample to some exit: {counts}; the check would be vacuous")
    wrong = agreement.unexplained
    if wrong.size:
        where = harness.first_divergence(ref, cand, ref_model, cand_model, test[wrong[:4]], bounds[-1])
        pytest.fail(
            f"{wrong.size} sample(s) leave at different exits although no confidence is within "
            f"{agreement.margin:.1e} of a threshold: samples {wrong[:10].tolist()}, {ref.backend} exits "
            f"{ref_exit[wrong[:10]].tolist()}, {cand.backend} exits {cand_exit[wrong[:10]].tolist()}; "
            f"first divergent layer on them: {where}"
        )
    assert share < max_share, (
        f"{agreement.borderline} of {TEST} samples ({share:.2%}) lie within {agreement.margin:.1e} "
        f"of a threshold, more than {max_share:.1%}"
    )
