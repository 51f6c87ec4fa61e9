"""Exit policy: the release's threshold search and dynamic evaluation, reproduced exactly."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvt_shared import (
    DynamicResult,
    confidences,
    dynamic_evaluate,
    exit_indices,
    exit_shares,
    find_thresholds,
    predictions,
    release_p_values,
    release_sweep,
    softmax,
    thresholds_for_accuracy,
    thresholds_for_budget,
)
from dvt_shared.calibration import search
from dvt_shared.exit_policy import ENTROPY, EXIT_POLICIES, MAX_SOFTMAX, exit_policy
from tests.release_fixtures import release_npz


@pytest.fixture(scope="module")
def release():
    return release_npz("release_exit_policy.npz")


def bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.int32)


# --- oracle: the release's loops, transcribed literally -------------------------------

def loop_thresholds(conf: np.ndarray, shares, rng: random.Random) -> np.ndarray:
    n_exits, n = conf.shape
    filtered = [0] * n
    thr = [np.float32(1e8)] * n_exits
    for k in range(n_exits - 1):
        # The release's descending sort is not stable: shuffle ties to show it cannot matter.
        order = sorted(range(n), key=lambda i: (-conf[k][i], rng.random()))
        out_n = math.floor(np.float32(n) * np.float32(shares[k]))
        count = 0
        for i in order:
            if filtered[i] == 0:
                count += 1
                if count == out_n:
                    thr[k] = conf[k][i]
                    break
        for i in range(n):
            if conf[k][i] >= thr[k]:
                filtered[i] += 1
    thr[n_exits - 1] = np.float32(-1e8)
    return np.array(thr, dtype=np.float32)


def loop_evaluate(conf, preds, targets, thr, flops):
    n_exits, n = conf.shape
    correct, counts = 0, [0] * n_exits
    for i in range(n):
        for k in range(n_exits):
            if conf[k][i] >= thr[k]:
                correct += int(targets[i] == preds[k][i])
                counts[k] += 1
                break
    return correct * 100.0 / n, sum(counts[k] / n * flops[k] for k in range(n_exits)), counts


def probs_from_conf(conf: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Two-class probs whose max is `conf` (>= 0.5), held by class `classes`."""
    probs = np.empty(conf.shape + (2,), dtype=np.float32)
    probs[..., 0] = np.where(classes == 0, conf, 1 - conf)
    probs[..., 1] = np.where(classes == 1, conf, 1 - conf)
    return probs


# --- the release's fixture ------------------------------------------------------------

def test_p_values_are_the_releases():
    p = release_p_values()
    assert p.shape == (59,)
    np.testing.assert_array_equal(p, [i / 20 for i in range(1, 60)])


def test_shares_match_release(release):
    worst = 0
    for i in range(1, 60):
        ours, theirs = exit_shares(i / 20, 3), release[f"shares_{i}"]
        assert ours.dtype == np.float32
        # NumPy's float32 exp/log differ from PyTorch's by at most an ulp or two here.
        np.testing.assert_array_max_ulp(ours, theirs, maxulp=2)
        worst = max(worst, int(np.abs(bits(ours) - bits(theirs)).max()))
    assert worst <= 2


def test_thresholds_match_release_bitwise(release):
    probs = release["probs"]
    for i in range(1, 60):
        expected = bits(release[f"thr_{i}"])
        np.testing.assert_array_equal(bits(find_thresholds(probs, exit_shares(i / 20, 3))), expected, err_msg=f"i={i}")
        np.testing.assert_array_equal(bits(find_thresholds(probs, release[f"shares_{i}"])), expected, err_msg=f"i={i}")


def test_accuracy_and_cost_match_release(release):
    probs, targets, flops = release["probs"], release["targets"], release["flops"]
    for i in range(1, 60):
        result = dynamic_evaluate(probs, targets, flops, release[f"thr_{i}"])
        assert isinstance(result, DynamicResult)
        assert result.accuracy == pytest.approx(float(release[f"acc_{i}"]), abs=1e-9)
        # The release accumulates the cost in float32.
        assert result.expected_flops == pytest.approx(float(release[f"flops_{i}"]), abs=1e-6)
        assert result.exit_counts.sum() == probs.shape[1] and result.undecided == 0


def test_release_sweep_reproduces_fixture(release):
    probs, targets, flops = release["probs"], release["targets"], release["flops"]
    points = release_sweep(probs, targets, flops)
    assert len(points) == 59
    for i, (p, thr, acc, cost) in enumerate(points, start=1):
        assert p == i / 20
        np.testing.assert_array_equal(bits(thr), bits(release[f"thr_{i}"]))
        assert acc == pytest.approx(float(release[f"acc_{i}"]), abs=1e-9)
        assert cost == pytest.approx(float(release[f"flops_{i}"]), abs=1e-6)


def test_release_sweep_calibrates_on_calib_probs(release):
    probs, targets, flops = release["probs"], release["targets"], release["flops"]
    calib, test, test_targets = probs[:, :250], probs[:, 250:], targets[250:]
    points = release_sweep(test, test_targets, flops, calib_probs=calib)
    for p, thr, acc, cost in points[::10]:
        np.testing.assert_array_equal(thr, find_thresholds(calib, exit_shares(p, 3)))
        result = dynamic_evaluate(test, test_targets, flops, thr)
        assert (acc, cost) == (result.accuracy, result.expected_flops)
    # Calibrating elsewhere must change something, or calib_probs would be ignored.
    same = release_sweep(test, test_targets, flops)
    assert any(not np.array_equal(a.thresholds, b.thresholds) for a, b in zip(points, same))


# --- vectorised search against the release's loops ------------------------------------

LEVELS = np.array([0.5, 0.6, 0.75, 0.9, 1.0], dtype=np.float32)


@settings(max_examples=150, deadline=None)
@given(
    n_exits=st.integers(2, 4),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_vectorised_matches_release_loops(n_exits, n, seed):
    gen = np.random.default_rng(seed)
    # Few distinct confidence levels: many exact ties, across and within exits.
    conf = LEVELS[gen.integers(0, LEVELS.size, size=(n_exits, n))]
    probs = probs_from_conf(conf, gen.integers(0, 2, size=(n_exits, n)))
    targets = gen.integers(0, 2, size=n)
    weights = gen.integers(0, 6, size=n_exits).astype(np.float64)
    weights[gen.integers(0, n_exits)] += 1  # never all zero
    shares = weights / weights.sum()
    flops = np.cumsum(gen.uniform(0.1, 2.0, size=n_exits))

    thr = find_thresholds(probs, shares)
    np.testing.assert_array_equal(bits(thr), bits(loop_thresholds(conf, shares, random.Random(seed))))

    result = dynamic_evaluate(probs, targets, flops, thr)
    acc, cost, counts = loop_evaluate(conf, predictions(probs), targets, thr, flops)
    assert result.accuracy == pytest.approx(acc, abs=1e-9)
    assert result.expected_flops == pytest.approx(cost, rel=1e-12)
    np.testing.assert_array_equal(result.exit_counts, counts)


def test_all_samples_tied():
    conf = np.full((3, 10), 0.5, dtype=np.float32)
    probs = probs_from_conf(conf, np.zeros((3, 10), dtype=int))
    shares = [0.5, 0.3, 0.2]
    thr = find_thresholds(probs, shares)
    # The 5th most confident has 0.5, so everybody (tied at 0.5) leaves at the first exit,
    # and the second exit's 3 can never be reached among the 0 left.
    np.testing.assert_array_equal(thr, np.float32([0.5, 1e8, -1e8]))
    np.testing.assert_array_equal(thr, loop_thresholds(conf, shares, random.Random(0)))
    result = dynamic_evaluate(probs, np.zeros(10, dtype=int), [1.0, 2.0, 3.0], thr)
    np.testing.assert_array_equal(result.exit_counts, [10, 0, 0])
    assert result.expected_flops == 1.0


def test_ties_at_the_cut_all_leave():
    conf = np.array([[0.9, 0.8, 0.8, 0.8, 0.6, 0.55], [0.7] * 6], dtype=np.float32)
    probs = probs_from_conf(conf, np.zeros_like(conf, dtype=int))
    thr = find_thresholds(probs, [2 / 6, 4 / 6])  # out_n = 2 at the first exit
    assert thr[0] == np.float32(0.8)
    np.testing.assert_array_equal(exit_indices(probs, thr), [0, 0, 0, 0, 1, 1])


def test_empty_exit(release):
    probs, targets, flops = release["probs"], release["targets"], release["flops"]
    # floor(500 * 0.001) = 0: nobody is meant to leave at the first exit.
    thr = find_thresholds(probs, [0.001, 0.5, 0.499])
    assert thr[0] == np.float32(1e8) and thr[1] != np.float32(1e8) and thr[2] == np.float32(-1e8)
    result = dynamic_evaluate(probs, targets, flops, thr)
    assert result.exit_counts[0] == 0
    assert result.exit_counts[1] >= 250  # floor(500 * 0.5), more with ties


def test_share_beyond_remaining_keeps_exit_closed():
    conf = np.array([[0.9, 0.9, 0.9, 0.6], [0.8, 0.8, 0.8, 0.8], [0.7] * 4], dtype=np.float32)
    probs = probs_from_conf(conf, np.zeros_like(conf, dtype=int))
    # 1 leaves at the first exit, but ties take 3; the second exit wants 2 of the 1 left.
    thr = find_thresholds(probs, [0.25, 0.5, 0.25])
    np.testing.assert_array_equal(thr, np.float32([0.9, 1e8, -1e8]))
    np.testing.assert_array_equal(exit_indices(probs, thr), [0, 0, 0, 2])


# --- NaN confidences ------------------------------------------------------------------

def test_nan_confidence_is_not_routed(release):
    probs = release["probs"].copy()
    thr = release["thr_20"]
    clean = exit_indices(probs, thr)
    early, late = int(np.flatnonzero(clean == 0)[0]), int(np.flatnonzero(clean == 2)[0])
    probs[0, late, 0] = np.nan   # met before any decision: undecidable
    probs[2, early, 0] = np.nan  # never reached: harmless in a real cascade
    index = exit_indices(probs, thr)
    assert index[late] == -1
    assert index[early] == 0
    others = np.ones(index.size, dtype=bool)
    others[late] = False
    np.testing.assert_array_equal(index[others], clean[others])
    np.testing.assert_array_equal(exit_indices(confidences(probs), thr), index)


def test_nan_at_last_exit_is_reported(release):
    probs, targets, flops = release["probs"].copy(), release["targets"], release["flops"]
    thr = release["thr_20"]
    clean = dynamic_evaluate(probs, targets, flops, thr)
    last = np.flatnonzero(clean.exit_index == 2)[:3]
    probs[:, last] = np.nan  # even -1e8 is not met by NaN, which the release would let slip
    with pytest.warns(RuntimeWarning, match="3 of 500 samples could not be routed"):
        result = dynamic_evaluate(probs, targets, flops, thr)
    assert result.undecided == 3
    np.testing.assert_array_equal(result.exit_index[last], -1)
    assert result.exit_counts.sum() + result.undecided == 500
    np.testing.assert_array_equal(result.exit_counts, clean.exit_counts - [0, 0, 3])
    lost = int((targets[last] == predictions(release["probs"])[2, last]).sum())
    assert result.accuracy == pytest.approx(clean.accuracy - lost * 100.0 / 500)
    # NaN at the first exit stops them there, so they are charged the first exit only.
    assert result.expected_flops == pytest.approx(clean.expected_flops - 3 * (flops[2] - flops[0]) / 500)


def test_last_exit_only_sends_every_sample_to_the_last_exit():
    from dvt_shared.exit_policy import last_exit_only

    conf = np.array([[1.0, 0.5, 0.0, 0.9], [1.0, 1.0, 0.2, 0.0], [0.3, 0.9, 1.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(exit_indices(conf, last_exit_only(3)), [2, 2, 2, 2])


def test_unmet_last_threshold_is_undecided():
    probs = probs_from_conf(np.full((2, 4), 0.6, dtype=np.float32), np.zeros((2, 4), dtype=int))
    np.testing.assert_array_equal(exit_indices(probs, [0.9, 0.9]), [-1] * 4)
    with pytest.warns(RuntimeWarning):
        result = dynamic_evaluate(probs, np.zeros(4, dtype=int), [1.0, 2.0], [0.9, 0.9])
    assert result.undecided == 4 and result.accuracy == 0.0 and result.expected_flops == 2.0


def test_nan_in_calibration_is_rejected(release):
    probs = release["probs"].copy()
    probs[1, 7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN confidences for 1 sample"):
        find_thresholds(probs, exit_shares(1.0, 3))
    with pytest.raises(ValueError, match="NaN"):
        thresholds_for_budget(probs, release["flops"], 2.0)


# --- softmax and confidences ----------------------------------------------------------

def test_softmax_is_stable_and_exact():
    logits = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    out = softmax(logits)
    assert np.isfinite(out).all()
    e = np.exp([-1.0, 0.0, -2.0])
    np.testing.assert_allclose(out[0], e / e.sum(), rtol=1e-15)
    np.testing.assert_allclose(out[1], [1 / 3] * 3, rtol=1e-15)
    assert softmax(logits.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(softmax(logits.T, axis=0), out.T, rtol=1e-15)


def test_confidences_and_predictions():
    probs = softmax(np.random.default_rng(0).normal(size=(3, 7, 5)))
    np.testing.assert_array_equal(confidences(probs), probs.max(-1))
    np.testing.assert_array_equal(predictions(probs), probs.argmax(-1))
    assert confidences(probs).shape == (3, 7)


# --- budgets --------------------------------------------------------------------------

def _cost(release, thr):
    return dynamic_evaluate(release["probs"], release["targets"], release["flops"], thr).expected_flops


def test_budget_grid_is_feasible_and_monotone(release):
    probs, flops = release["probs"], release["flops"]
    budgets = np.linspace(flops[0], flops[-1], 16)
    costs = [_cost(release, thresholds_for_budget(probs, flops, b)) for b in budgets]
    assert all(c <= b for c, b in zip(costs, budgets))
    assert all(a <= b for a, b in zip(costs, costs[1:]))
    # The candidate set is dense: on this data no budget is missed by more than ~8 samples.
    assert max(b - c for c, b in zip(costs, budgets)) < 0.02
    assert costs[0] == flops[0] and costs[-1] == flops[-1]


def test_budget_recovers_release_points(release):
    probs, flops = release["probs"], release["flops"]
    for i in (1, 13, 29, 47, 59):
        spent = _cost(release, release[f"thr_{i}"])
        assert _cost(release, thresholds_for_budget(probs, flops, spent)) == spent


def test_budget_thresholds_have_release_form(release):
    thr = thresholds_for_budget(release["probs"], release["flops"], 1.5)
    assert thr.dtype == np.float32 and thr.shape == (3,) and thr[-1] == np.float32(-1e8)


@pytest.mark.parametrize(
    "budget, message",
    [(0.3, r"0\.3 is below the first exit's cost 0\.47"), (float("nan"), "NaN")],
)
def test_budget_out_of_range(release, budget, message):
    with pytest.raises(ValueError, match=message):
        thresholds_for_budget(release["probs"], release["flops"], budget)


@pytest.mark.parametrize("budget", [3.5, 3.5 + 1e-12, 3.6, 1e9])
def test_budget_at_or_above_the_last_exit_lets_everyone_run(release, budget):
    flops = release["flops"]
    at_last = thresholds_for_budget(release["probs"], flops, flops[-1])
    np.testing.assert_array_equal(thresholds_for_budget(release["probs"], flops, budget), at_last)
    assert _cost(release, at_last) == pytest.approx(flops[-1])


def test_thresholds_refuse_logits(release):
    logits = np.log(release["probs"]) + 3.0
    for searching in (
        lambda: find_thresholds(logits, exit_shares(1.0, 3)),
        lambda: thresholds_for_budget(logits, release["flops"], 2.0),
        lambda: thresholds_for_accuracy(logits, release["targets"], release["flops"], 50.0),
    ):
        with pytest.raises(ValueError, match="must hold softmax probabilities.*pass softmax"):
            searching()


# --- validation -----------------------------------------------------------------------

GOOD_PROBS = softmax(np.random.default_rng(1).normal(size=(3, 6, 4)))
GOOD_TARGETS = np.zeros(6, dtype=int)
GOOD_FLOPS = [1.0, 2.0, 3.0]
GOOD_THR = [0.5, 0.5, -1e8]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: find_thresholds(GOOD_PROBS[0], [0.5, 0.3, 0.2]), "3-D"),
        (lambda: find_thresholds(GOOD_PROBS[:, :0], [0.5, 0.3, 0.2]), "no samples"),
        (lambda: find_thresholds(GOOD_PROBS, [0.5, 0.5]), r"shares must have shape \(3,\)"),
        (lambda: find_thresholds(GOOD_PROBS, [0.5, 0.3, 0.1]), "sum to 1"),
        (lambda: find_thresholds(GOOD_PROBS, [1.2, -0.4, 0.2]), "non-negative"),
        (lambda: exit_indices(GOOD_PROBS, [0.5, -1e8]), r"thresholds must have shape \(3,\)"),
        (lambda: exit_indices(GOOD_PROBS, [0.5, np.nan, -1e8]), "NaN"),
        (lambda: exit_indices(GOOD_PROBS[0, 0], GOOD_THR), "shape"),
        (lambda: dynamic_evaluate(GOOD_PROBS, GOOD_TARGETS, [1.0, 3.0, 2.0], GOOD_THR), "strictly increasing"),
        (lambda: dynamic_evaluate(GOOD_PROBS, GOOD_TARGETS, [1.0, 2.0], GOOD_THR),
         r"cumulative_flops must have shape \(3,\)"),
        (lambda: dynamic_evaluate(GOOD_PROBS, GOOD_TARGETS[:5], GOOD_FLOPS, GOOD_THR),
         r"targets must have shape \(6,\)"),
        (lambda: dynamic_evaluate(GOOD_PROBS, GOOD_TARGETS + 0.5, GOOD_FLOPS, GOOD_THR), "integer"),
        (lambda: thresholds_for_budget(GOOD_PROBS, [1.0, 1.0, 3.0], 2.0), "strictly increasing"),
        (lambda: release_sweep(GOOD_PROBS, GOOD_TARGETS, GOOD_FLOPS, calib_probs=GOOD_PROBS[:2]), "2 exits"),
        (lambda: exit_shares(0.0, 3), "positive"),
        (lambda: exit_shares(0.5, 0), "n_exits"),
    ],
)
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_thresholds_for_accuracy_is_cheapest_reaching_target(release):
    from dvt_shared import thresholds_for_accuracy

    probs, targets, flops = release["probs"], release["targets"], release["flops"]
    last_only = dynamic_evaluate(probs, targets, flops, [1e8, 1e8, -1e8]).accuracy
    for target in (30.0, 0.5 * last_only, last_only):
        thr = thresholds_for_accuracy(probs, targets, flops, target)
        result = dynamic_evaluate(probs, targets, flops, thr)
        assert result.accuracy >= target
        # nothing among the release's own points is cheaper while reaching the target
        for point in release_sweep(probs, targets, flops):
            if point.accuracy >= target:
                assert result.expected_flops <= point.expected_flops + 1e-9
    with pytest.raises(ValueError, match="no policy reaches 100.5%"):
        thresholds_for_accuracy(probs, targets, flops, 100.5)


def test_stops_at_exit_rule():
    from dvt_shared import stops_at_exit

    conf = np.array([0.5, 0.7, np.nan, 0.6999], dtype=np.float32)
    np.testing.assert_array_equal(stops_at_exit(conf, np.float32(0.7)), [False, True, True, False])


def test_entropy_policy_scores_certainty():
    one_hot = np.array([[[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]]])
    np.testing.assert_allclose(ENTROPY.scores(one_hot)[0], [1.0, 0.0, 0.5], atol=1e-7)
    assert MAX_SOFTMAX.scores(one_hot).tolist() == [[1.0, 0.25, 0.5]]
    assert exit_policy(None) is MAX_SOFTMAX and exit_policy("entropy") is ENTROPY
    with pytest.raises(ValueError, match="unknown exit policy 'halting'"):
        exit_policy("halting")


@pytest.mark.parametrize("policy", EXIT_POLICIES.values(), ids=EXIT_POLICIES)
def test_every_policy_moves_by_at_most_its_lipschitz_constant(policy):
    """|d score| <= lipschitz x max|d logit|: what the policy's decision margin rests on, checked on logits
    from flat to near one-hot, 2 to 1000 classes, each moved by a random perturbation of max size 1e-3."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for classes in (2, 3, 10, 1000):
        logits = rng.standard_normal((200, classes)) * rng.uniform(0.0, 12.0, (200, 1))
        delta = rng.uniform(-1e-3, 1e-3, logits.shape)
        before = policy.score(softmax(logits))
        after = policy.score(softmax(logits + delta))
        worst = max(worst, float((np.abs(after - before) / np.abs(delta).max(axis=1)).max()))
    assert 0 < worst <= policy.lipschitz


@pytest.mark.parametrize("policy", EXIT_POLICIES.values(), ids=EXIT_POLICIES)
def test_every_policy_searches_the_same_way(release, policy):
    """One search over the policy's confidences: p shares, a budget and an accuracy target each give
    thresholds that route as asked, through the same rule."""
    probs, targets, flops = release["probs"], release["targets"], release["flops"]
    n = probs.shape[1]
    by_shares = search(policy, probs, targets, flops, p=1.5)
    np.testing.assert_array_equal(by_shares, find_thresholds(probs, exit_shares(1.5, 3), policy))
    routed = exit_indices(policy.scores(probs), by_shares)
    np.testing.assert_array_equal(routed, exit_indices(probs, by_shares, policy))
    assert np.bincount(routed, minlength=3)[0] >= np.floor(np.float32(n) * exit_shares(1.5, 3)[0])
    budget = search(policy, probs, targets, flops, budget=2.0)
    assert dynamic_evaluate(probs, targets, flops, budget, policy).expected_flops <= 2.0
    accurate = search(policy, probs, targets, flops, accuracy=60.0)
    assert dynamic_evaluate(probs, targets, flops, accurate, policy).accuracy >= 60.0
    with pytest.raises(ValueError, match="exactly one of p, budget, accuracy"):
        search(policy, probs, targets, flops, p=1.0, budget=2.0)
