"""With the same thresholds, every sample leaves the cascade at the same exit in both backends.

Thresholds come from an exit policy (the release's max-softmax, and the entropy policy; the
release's search with geometric shares) on a calibration set scored by PyTorch, and are applied to a separate test set, as the
release does with held-out data. Only samples whose confidence lies within the target's
margin of a threshold they meet on the way may route differently; they are counted.
MindSpore runs in graph mode here, the mode a deployment would use.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from dvt_shared.error_bounds import decision_agreement
from dvt_shared.exit_policy import EXIT_POLICIES, MAX_SOFTMAX, exit_indices, exit_shares, find_thresholds, softmax
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


@pytest.mark.parametrize("policy", EXIT_POLICIES.values(), ids=EXIT_POLICIES)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_same_exit_for_every_sample(target, policy):
    target.activate()
    # Strong noise makes the random model's confidences depend on the image and spread out; with
    # the narrow spread of a freshly initialised model, many would crowd each threshold.
    torch_model = harness.torch_model(CASE, seed=5, noise=0.1)
    ms_model = harness.mindspore_twin(torch_model)
    size = torch_model.config.img_size

    calibration = structured_noise(CALIBRATION, size, seed=11)
    thresholds = find_thresholds(
        softmax(exit_logits(lambda x: harness.torch_outputs(torch_model, x, target.torch_device), calibration)),
        exit_shares(P, torch_model.num_exits), policy,
    )

    test = structured_noise(TEST, size, seed=12)
    torch_logits = exit_logits(lambda x: harness.torch_outputs(torch_model, x, target.torch_device), test)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms_logits = exit_logits(lambda x: harness.mindspore_outputs(ms_model, x), test)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    torch_conf, ms_conf = policy.scores(softmax(torch_logits)), policy.scores(softmax(ms_logits))
    torch_exit, ms_exit = exit_indices(torch_conf, thresholds), exit_indices(ms_conf, thresholds)

    # margins from each exit's logit bound (dvt_shared.error_bounds), the logits scaled by PyTorch's
    bounds = target.errors.exit_bounds(torch_model.config.depth, torch_logits)
    margins = policy.margin(bounds)
    agreement = decision_agreement(torch_conf, ms_exit, thresholds, margins, ms_conf)
    share = agreement.borderline_share
    conf_delta = np.abs(ms_conf - torch_conf).max(axis=1)
    counts = np.bincount(torch_exit, minlength=torch_model.num_exits).tolist()
    # a confidence moves by at most the policy's Lipschitz constant times its logits' bound
    conf_ok = bool((conf_delta <= policy.lipschitz * bounds).all())
    # the target's share is set for the release's margin; a policy with a wider margin (a larger Lipschitz
    # constant) has proportionally more samples within it, for confidences spread smoothly around a threshold
    max_share = target.max_borderline_share * policy.lipschitz / MAX_SOFTMAX.lipschitz
    ok = agreement.unexplained.size == 0 and share < max_share and conf_ok
    record(
        f"decisions, {policy.name}", CASE.name, target.name, f"{TEST} samples, exits {counts}",
        f"{agreement.differ} differ, {agreement.borderline} borderline (margin {agreement.margin:.1e}), "
        f"max |dconf| {conf_delta.max():.1e}, closest to a threshold {agreement.closest:.1e}",
        f"0 non-borderline, < {max_share:.1%}", ok,
    )
    assert conf_ok, (
        f"{policy.name} confidences differ by up to {conf_delta} per exit, more than {policy.lipschitz} x the logit "
        f"bounds {bounds}"
    )
    assert min(counts) > 0, f"thresholds {thresholds} route no sample to some exit: {counts}; the check would be vacuous"
    wrong = agreement.unexplained
    if wrong.size:
        where = harness.first_divergence(torch_model, ms_model, test[wrong[:4]], bounds[-1], target.torch_device)
        pytest.fail(
            f"{wrong.size} sample(s) leave at different exits although no confidence is within "
            f"{agreement.margin:.1e} of a threshold: samples {wrong[:10].tolist()}, PyTorch exits "
            f"{torch_exit[wrong[:10]].tolist()}, MindSpore exits {ms_exit[wrong[:10]].tolist()}; "
            f"first divergent layer on them: {where}"
        )
    assert share < max_share, (
        f"{agreement.borderline} of {TEST} samples ({share:.2%}) lie within {agreement.margin:.1e} "
        f"of a threshold, more than {max_share:.1%}"
    )
