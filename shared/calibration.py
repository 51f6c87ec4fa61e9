"""Calibrating a cascade's exit thresholds and scoring them, for any exit policy (`dvt_shared.exit_policy`).

Reproduces the published release's inference script exactly, vectorised: its threshold search
(`find_thresholds`), its simulated early exit (`dynamic_evaluate`) and its sweep over p = i/20
(`release_sweep`); adds the searches for a compute budget and for an accuracy, and `search`, the one entry
point for a target. The rule and the searches are the same for every policy.
"""
from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .exit_policy import (
    ALL_EXIT,
    MAX_SOFTMAX,
    NO_EXIT,
    ExitPolicy,
    check_probs,
    check_thresholds,
    float32_confidences,
    predictions,
    route,
)

# Softmax rows sum to 1 up to rounding; fp16 outputs are off by up to ~1e-3 over 1000 classes.
PROB_SUM_TOL = 1e-2

# Shares are float32 in the release, so their sum is 1 only to float32 precision.
SHARE_SUM_TOL = 1e-5


# Fewest samples a threshold search of this module accepts: one sample separates nothing.
MIN_CALIBRATION_SAMPLES = 2


# Budget search over the geometric family, in t = log p: a coarse grid on [-12, 12]
# (beyond it the shares barely move for realistic sample counts), then refinement of
# the widest cost gaps, capped so that ImageNet-sized sets stay at a few seconds.
_LOG_P_LIMIT = 12.0


_LOG_P_GRID = 97


_MIN_LOG_P_STEP = 1e-6


_MAX_SEARCH_EVALS = 2048


@dataclass(frozen=True, eq=False)
class DynamicResult:
    """Outcome of routing every sample through the cascade.

    accuracy: % of all samples classified correctly at their exit (undecided count as wrong).
    expected_flops: mean cost per sample, in the units of cumulative_flops; an undecided
        sample is charged what it spent, up to the exit where it was stopped.
    exit_counts: samples leaving at each exit (undecided excluded).
    exit_index: exit of each sample, -1 where it could not be decided.
    undecided: samples with exit index -1.
    """

    accuracy: float
    expected_flops: float
    exit_counts: np.ndarray
    exit_index: np.ndarray
    undecided: int


class SweepPoint(NamedTuple):
    p: float
    thresholds: np.ndarray
    accuracy: float
    expected_flops: float


def _check_distributions(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    """`probs`, unless some row is not a probability distribution (logits passed by mistake).

    Rows with a NaN are left to the NaN handling of the caller.
    """
    finite = ~np.isnan(probs).any(axis=-1)
    rows = probs[finite]
    sums = rows.sum(axis=-1, dtype=np.float64)
    bad = (np.abs(sums - 1.0) > PROB_SUM_TOL) | (rows < 0).any(axis=-1) | (rows > 1).any(axis=-1)
    if bad.any():
        first = np.flatnonzero(bad)[0]
        raise ValueError(
            f"{name} must hold softmax probabilities (each row in [0, 1], summing to 1), but "
            f"{int(bad.sum())} row(s) do not, e.g. one summing to {sums[first]:.4g}: "
            "pass softmax(logits), not logits"
        )
    return probs


def check_calibration_data(probs, targets=None) -> None:
    """ValueError unless `probs` (and `targets`, if given) can calibrate thresholds.

    A threshold is a confidence that separates samples, so calibration needs at least
    MIN_CALIBRATION_SAMPLES samples, a classifier over at least two classes (with one, every
    confidence is 1), and labels of more than one class (thresholds tuned on a single class
    say nothing about the others). The release's own search (`find_thresholds`) runs on
    anything, as the release does; the searches of this module and `dvt calibrate` check.
    """
    arr = check_probs(probs)
    _, n, classes = arr.shape
    if n < MIN_CALIBRATION_SAMPLES:
        raise ValueError(f"calibration needs at least {MIN_CALIBRATION_SAMPLES} samples, got {n}")
    if classes < 2:
        raise ValueError(
            f"calibration probs have {classes} class: every confidence is 1, so no threshold separates samples"
        )
    if targets is not None:
        labels = np.unique(_check_targets(targets, n))
        if labels.size < 2:
            raise ValueError(
                f"calibration labels hold a single class ({labels[0]}) in {n} samples; "
                "thresholds tuned on one class do not transfer to the others"
            )


def _check_shares(shares, n_exits: int) -> np.ndarray:
    s = np.asarray(shares, dtype=np.float64)
    if s.shape != (n_exits,):
        raise ValueError(f"shares must have shape ({n_exits},), one per exit, got {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"shares must be finite and non-negative, got {s.tolist()}")
    if abs(s.sum() - 1.0) > SHARE_SUM_TOL:
        raise ValueError(f"shares must sum to 1 (within {SHARE_SUM_TOL}), got sum {s.sum()!r}")
    # The release holds its shares in a float32 tensor.
    return s.astype(np.float32)


def _check_flops(cumulative_flops, n_exits: int) -> np.ndarray:
    f = np.asarray(cumulative_flops, dtype=np.float64)
    if f.shape != (n_exits,):
        raise ValueError(f"cumulative_flops must have shape ({n_exits},), one per exit, got {f.shape}")
    if not np.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"cumulative_flops must be finite and non-negative, got {f.tolist()}")
    if (np.diff(f) <= 0).any():
        raise ValueError(
            f"cumulative_flops must be strictly increasing (cost of running up to each exit), got {f.tolist()}"
        )
    return f


def _check_targets(targets, n: int) -> np.ndarray:
    t = np.asarray(targets)
    if t.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), one per sample, got {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
    return t


def exit_shares(p: float, n_exits: int) -> np.ndarray:
    """Target share of samples leaving at each exit, proportional to p**k (k = 1..n_exits).

    Float32 arithmetic in the release's order, exp(log(p) * k) normalised. NumPy's float32
    exp/log may differ from PyTorch's by an ulp or two, which the release's floor(n * share)
    absorbs unless n * share lies within a few ulps of an integer.
    """
    if isinstance(n_exits, bool) or not isinstance(n_exits, (int, np.integer)) or n_exits < 1:
        raise ValueError(f"n_exits must be a positive integer, got {n_exits!r}")
    if not np.isfinite(p) or p <= 0:
        raise ValueError(f"p must be finite and positive, got {p!r}")
    log_p = np.log(np.array([p], dtype=np.float32))
    shares = np.exp(log_p * np.arange(1, n_exits + 1, dtype=np.float32))
    shares = shares / shares.sum(dtype=np.float32)
    if not np.isfinite(shares).all():
        raise ValueError(f"p={p!r} overflows float32 shares over {n_exits} exits")
    return shares


def release_p_values() -> np.ndarray:
    """The release's sweep: p = i/20 for i = 1..59."""
    return np.arange(1, 60) / 20


def _search_thresholds(conf: np.ndarray, shares: np.ndarray) -> np.ndarray:
    n_exits, n = conf.shape
    thr = np.full(n_exits, NO_EXIT, dtype=np.float32)
    remaining = np.ones(n, dtype=bool)
    # The release multiplies the sample count by a float32 share, in float32.
    n32 = np.float32(n)
    for k in range(n_exits - 1):
        out_n = int(np.floor(n32 * shares[k]))
        candidates = conf[k, remaining]
        # The release's walk stops at the out_n-th remaining sample in descending order;
        # its confidence is the out_n-th largest whatever order ties were sorted in.
        if 0 < out_n <= candidates.size:
            rank = candidates.size - out_n
            thr[k] = np.partition(candidates, rank)[rank]
        remaining &= conf[k] < thr[k]
    thr[-1] = ALL_EXIT
    return thr


def find_thresholds(probs, shares, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    """The release's threshold search: float32 thresholds, the last one -1e8.

    For each exit but the last, floor(n * share) of the samples still present should leave:
    its threshold is the confidence of the floor(n * share)-th most confident of them (ties
    at that confidence all leave), or 1e8 when that count is 0 or exceeds those present.
    """
    conf = float32_confidences(_check_distributions(check_probs(probs)), policy)
    if np.isnan(conf).any():
        bad = np.isnan(conf).any(axis=0).sum()
        raise ValueError(f"probs give NaN confidences for {bad} sample(s); thresholds would be undefined")
    return _search_thresholds(conf, _check_shares(shares, conf.shape[0]))


def _expected_cost(stop: np.ndarray, flops: np.ndarray) -> float:
    return float(np.bincount(stop, minlength=flops.size) @ flops / stop.size)


def dynamic_evaluate(probs, targets, cumulative_flops, thresholds, policy: ExitPolicy = MAX_SOFTMAX) -> DynamicResult:
    """The release's dynamic evaluation: route every sample, score it at its exit."""
    probs = check_probs(probs)
    n_exits, n, _ = probs.shape
    targets = _check_targets(targets, n)
    flops = _check_flops(cumulative_flops, n_exits)
    conf = float32_confidences(probs, policy)
    index, stop = route(conf, check_thresholds(thresholds, n_exits))
    decided = index >= 0
    undecided = int(n - decided.sum())
    if undecided:
        warnings.warn(f"{undecided} of {n} samples could not be routed (NaN confidence or no threshold met)",
                      RuntimeWarning, stacklevel=2)
    preds = predictions(probs)[np.maximum(index, 0), np.arange(n)]
    correct = int((decided & (preds == targets)).sum())
    return DynamicResult(
        accuracy=correct * 100.0 / n,
        expected_flops=_expected_cost(stop, flops),
        exit_counts=np.bincount(index[decided], minlength=n_exits),
        exit_index=index,
        undecided=undecided,
    )


def _geometric_shares(log_p: float, n_exits: int) -> np.ndarray:
    # p**k normalised, computed as a softmax of k * log p so that no p overflows.
    z = log_p * np.arange(1, n_exits + 1)
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(np.float32)


def _budget_candidates(conf: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Costs and thresholds of a fixed, budget-independent set of policies.

    The two extremes (everyone at the first exit, everyone at the last), the release's 59
    points, and the geometric family p**k on a grid of log p refined where neighbouring
    costs differ by more than one sample moving one exit (widest gaps first).
    """
    n_exits, n = conf.shape
    found: list[np.ndarray] = []
    costs: list[float] = []

    def add(thr: np.ndarray) -> float:
        found.append(thr)
        costs.append(_expected_cost(route(conf, thr.astype(np.float64))[1], flops))
        return costs[-1]

    add(np.full(n_exits, ALL_EXIT, dtype=np.float32))
    add(np.concatenate([np.full(n_exits - 1, NO_EXIT, dtype=np.float32), [ALL_EXIT]]))
    if n_exits == 1:
        return np.asarray(costs), found
    for p in release_p_values():
        add(_search_thresholds(conf, exit_shares(p, n_exits)))

    def at(log_p: float) -> float:
        return add(_search_thresholds(conf, _geometric_shares(log_p, n_exits)))

    grid = np.linspace(-_LOG_P_LIMIT, _LOG_P_LIMIT, _LOG_P_GRID)
    grid_costs = [at(t) for t in grid]
    step = np.diff(flops).min() / n
    gaps = [(-abs(cb - ca), a, ca, b, cb)
            for a, ca, b, cb in zip(grid[:-1], grid_costs[:-1], grid[1:], grid_costs[1:])]
    heapq.heapify(gaps)
    evals = len(grid)
    while gaps and evals < _MAX_SEARCH_EVALS:
        neg_gap, a, ca, b, cb = heapq.heappop(gaps)
        if -neg_gap <= step or b - a <= _MIN_LOG_P_STEP:
            continue
        m = 0.5 * (a + b)
        cm = at(m)
        evals += 1
        heapq.heappush(gaps, (-abs(cm - ca), a, ca, m, cm))
        heapq.heappush(gaps, (-abs(cb - cm), m, cm, b, cb))
    return np.asarray(costs), found


def thresholds_for_budget(probs, cumulative_flops, budget: float, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    """Thresholds whose expected cost on `probs` is the largest found that is <= budget.

    Searched over the release's geometric family (shares proportional to p**k) plus the
    two extreme policies. Cost is only roughly monotone in p: the floors in the release's
    search and ties in confidence make it wiggle by a sample or so, so bisection on p could
    answer non-monotonically in the budget. Instead the answer is the best of a fixed,
    budget-independent set of candidates, which makes it never exceed the budget and never
    decrease as the budget grows; it is the best of that set, not of all thresholds.
    The cost holds on `probs`; on other data the same thresholds may cost more or less.
    """
    check_calibration_data(probs)
    conf = float32_confidences(_check_distributions(check_probs(probs)), policy)
    if np.isnan(conf).any():
        raise ValueError("probs give NaN confidences; cannot search thresholds on them")
    flops = _check_flops(cumulative_flops, conf.shape[0])
    budget = float(budget)
    if np.isnan(budget):
        raise ValueError("budget is NaN")
    if budget < flops[0]:
        raise ValueError(
            f"budget {budget!r} is below the first exit's cost {flops[0]!r}, the least any policy "
            "can spend per sample"
        )
    # At or above the last exit's cost every sample may run to the end; the cumulative costs
    # are sums of floats, so a budget equal to their exact total may exceed them by rounding.
    budget = min(budget, float(flops[-1]))
    costs, found = _budget_candidates(conf, flops)
    best = int(np.argmax(np.where(costs <= budget, costs, -np.inf)))
    return found[best].copy()


def thresholds_for_accuracy(
    probs, targets, cumulative_flops, accuracy: float, policy: ExitPolicy = MAX_SOFTMAX
) -> np.ndarray:
    """The cheapest thresholds found whose accuracy on (probs, targets) is >= `accuracy` (%).

    Searched over the same budget-independent candidates as `thresholds_for_budget`.
    """
    check_calibration_data(probs, targets)
    probs = _check_distributions(check_probs(probs))
    conf = float32_confidences(probs, policy)
    if np.isnan(conf).any():
        raise ValueError("probs give NaN confidences; cannot search thresholds on them")
    flops = _check_flops(cumulative_flops, conf.shape[0])
    correct = predictions(probs) == _check_targets(targets, conf.shape[1])[None, :]
    accuracy = float(accuracy)
    if np.isnan(accuracy):
        raise ValueError("target accuracy is NaN")
    costs, found = _budget_candidates(conf, flops)
    n = conf.shape[1]
    accuracies = np.array([
        100.0 * correct[np.where(index >= 0, index, 0), np.arange(n)][index >= 0].sum() / n
        for index in (route(conf, thr.astype(np.float64))[0] for thr in found)
    ])
    feasible = accuracies >= accuracy
    if not feasible.any():
        raise ValueError(
            f"no policy reaches {accuracy}% on these samples; the best found reaches {accuracies.max():.2f}%"
        )
    return found[int(np.argmin(np.where(feasible, costs, np.inf)))].copy()


def release_sweep(
    probs, targets, cumulative_flops, calib_probs=None, policy: ExitPolicy = MAX_SOFTMAX
) -> list[SweepPoint]:
    """The release's sweep over p = i/20: thresholds found on calib_probs (default: probs)
    and evaluated on probs."""
    probs = check_probs(probs)
    calib = probs if calib_probs is None else check_probs(calib_probs, "calib_probs")
    n_exits = probs.shape[0]
    if calib.shape[0] != n_exits:
        raise ValueError(f"calib_probs has {calib.shape[0]} exits but probs has {n_exits}")
    out = []
    for p in release_p_values():
        thr = find_thresholds(calib, exit_shares(p, n_exits), policy)
        result = dynamic_evaluate(probs, targets, cumulative_flops, thr, policy)
        out.append(SweepPoint(float(p), thr, result.accuracy, result.expected_flops))
    return out


def search(policy: ExitPolicy, probs, targets, cumulative_flops, *, p: float | None = None,
           budget: float | None = None, accuracy: float | None = None) -> np.ndarray:
    """`policy`'s thresholds for one target, exactly one of: the release's geometric shares for `p`, the best
    found within a `budget` (units of cumulative_flops), the cheapest found reaching an `accuracy` (%)."""
    given = [name for name, value in (("p", p), ("budget", budget), ("accuracy", accuracy)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of p, budget, accuracy; got {given or 'none'}")
    if budget is not None:
        return thresholds_for_budget(probs, cumulative_flops, budget, policy=policy)
    if accuracy is not None:
        return thresholds_for_accuracy(probs, targets, cumulative_flops, accuracy, policy=policy)
    return find_thresholds(probs, exit_shares(p, np.asarray(probs).shape[0]), policy=policy)
