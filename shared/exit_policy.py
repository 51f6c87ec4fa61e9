"""Exit policy of a DVT cascade: confidences, thresholds, dynamic evaluation, budgets.

Reproduces the published release's inference script exactly, vectorised: its threshold
search (`find_thresholds`), its simulated early exit (`dynamic_evaluate`) and its sweep
over p = i/20 (`release_sweep`). Every decision is taken on float32 confidences, as in
the release, whose softmax outputs are float32 tensors.

What a confidence is comes from an `ExitPolicy`: the release's maximum softmax probability
(`MAX_SOFTMAX`, the default everywhere) or one minus the normalised entropy (`ENTROPY`). The
rule is the same for every policy (a sample stops at the first exit whose confidence reaches
its threshold), and so are the searches; the engines, `dvt calibrate`, `dvt predict` and the
parity tests take the policy as one object, whose `margin` turns a logit bound into the
distance from a threshold within which two runs may route a sample differently.

Departures from the release, where it fails silently: a NaN confidence is never routed
(the sample gets exit index -1 and is reported), and invalid inputs raise ValueError.
"""
from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

# The release's thresholds meaning "nobody leaves here" and "everybody left leaves here".
NO_EXIT = np.float32(1e8)
ALL_EXIT = np.float32(-1e8)

# Shares are float32 in the release, so their sum is 1 only to float32 precision.
SHARE_SUM_TOL = 1e-5

# Softmax rows sum to 1 up to rounding; fp16 outputs are off by up to ~1e-3 over 1000 classes.
PROB_SUM_TOL = 1e-2

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


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; float inputs keep their dtype."""
    x = np.asarray(logits)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    # Shifting by the max keeps exp from overflowing without changing the result.
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _check_probs(probs, name: str = "probs") -> np.ndarray:
    arr = np.asarray(probs)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be 3-D (n_exits, n_samples, n_classes), got shape {arr.shape}")
    n_exits, n, c = arr.shape
    if n_exits == 0 or c == 0:
        raise ValueError(f"{name} needs at least one exit and one class, got shape {arr.shape}")
    if n == 0:
        raise ValueError(f"{name} holds no samples (shape {arr.shape}); a policy needs at least one")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def _max_probability(probs: np.ndarray) -> np.ndarray:
    return probs.max(axis=-1)


def _certainty(probs: np.ndarray) -> np.ndarray:
    """1 - H(p) / log(classes): 1 for a one-hot distribution, 0 for the uniform one."""
    classes = probs.shape[-1]
    if classes < 2:
        raise ValueError("the entropy policy needs at least 2 classes")
    p = probs.astype(np.float64)
    positive = p > 0
    entropy = -np.where(positive, p * np.log(np.where(positive, p, 1.0)), 0.0).sum(axis=-1)
    return 1.0 - entropy / np.log(classes)


@dataclass(frozen=True)
class ExitPolicy:
    """Where a sample stops: at the first exit whose confidence (`score` of its softmax) reaches the threshold.

    `lipschitz` bounds how far the confidence moves when every logit moves by at most 1: the maximum
    softmax probability moves by at most 2 p (1 - p) <= 1/2 (dvt_shared.error_bounds); the certainty
    1 - H / log C by at most 2, since the entropy's gradient has 1-norm E|log p + H| <= 2 H <= 2 log C.
    """

    name: str
    score: Callable[[np.ndarray], np.ndarray]
    lipschitz: float
    description: str

    def scores(self, probs) -> np.ndarray:
        """(n_exits, n_samples) float32 confidences of probs (n_exits, n_samples, n_classes)."""
        return self.score(_check_probs(probs)).astype(np.float32)

    def scores_from_logits(self, logits) -> np.ndarray:
        """float32 confidences of one exit's logits (n_samples, n_classes), as an engine takes its decision."""
        return self.score(softmax(np.asarray(logits).astype(np.float32), axis=-1)).astype(np.float32)

    def margin(self, logit_bound):
        """The decision margin of a logit bound: two runs whose logits differ by at most the bound give
        confidences within lipschitz x bound of each other, so a threshold between them lies within half
        of that of one of them; samples that close to a threshold may route either way."""
        return np.asarray(logit_bound, dtype=np.float64) * self.lipschitz / 2

    def search(self, probs, targets, cumulative_flops, *, p: float | None = None, budget: float | None = None,
               accuracy: float | None = None) -> np.ndarray:
        """Thresholds for one target, exactly one of: the release's geometric shares for `p`, the best found
        within a `budget` (units of cumulative_flops), the cheapest found reaching an `accuracy` (%)."""
        given = [name for name, value in (("p", p), ("budget", budget), ("accuracy", accuracy)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of p, budget, accuracy; got {given or 'none'}")
        if budget is not None:
            return thresholds_for_budget(probs, cumulative_flops, budget, policy=self)
        if accuracy is not None:
            return thresholds_for_accuracy(probs, targets, cumulative_flops, accuracy, policy=self)
        return find_thresholds(probs, exit_shares(p, np.asarray(probs).shape[0]), policy=self)


MAX_SOFTMAX = ExitPolicy("max-softmax", _max_probability, 0.5, "the largest softmax probability (the release's)")
ENTROPY = ExitPolicy("entropy", _certainty, 2.0, "one minus the softmax's entropy over log(classes)")
EXIT_POLICIES = {policy.name: policy for policy in (MAX_SOFTMAX, ENTROPY)}


def exit_policy(name: str | None) -> ExitPolicy:
    """The policy called `name` (None: the release's max-softmax)."""
    if name is None:
        return MAX_SOFTMAX
    if name not in EXIT_POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; known: {', '.join(EXIT_POLICIES)}")
    return EXIT_POLICIES[name]


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
    arr = _check_probs(probs)
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


def confidences(probs, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    """(n_exits, n_samples) confidence of every exit under `policy` (default: its maximum softmax probability)."""
    return policy.score(_check_probs(probs))


def predictions(probs) -> np.ndarray:
    """(n_exits, n_samples) predicted class of every exit."""
    return _check_probs(probs).argmax(axis=-1)


def _conf32(probs_or_conf, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    arr = np.asarray(probs_or_conf)
    if arr.ndim == 3:
        return confidences(arr, policy).astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(
            "expected probs (n_exits, n_samples, n_classes) or confidences (n_exits, n_samples), "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"confidences need at least one exit and one sample, got shape {arr.shape}")
    return arr.astype(np.float32)


def last_exit_only(n_exits: int) -> np.ndarray:
    """Thresholds no confidence meets before the last exit: every stage runs on every image."""
    return check_thresholds([np.inf] * (n_exits - 1) + [-np.inf], n_exits)


def check_thresholds(thresholds, n_exits: int) -> np.ndarray:
    """Thresholds as float64, one per exit, none NaN (ValueError otherwise).

    float64 holds every float32 threshold exactly, so comparisons stay the release's.
    """
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.shape != (n_exits,):
        raise ValueError(f"thresholds must have shape ({n_exits},), one per exit, got {thr.shape}")
    if np.isnan(thr).any():
        raise ValueError(f"thresholds must not be NaN, got {thr.tolist()}")
    return thr


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
    conf = _conf32(_check_distributions(_check_probs(probs)), policy)
    if np.isnan(conf).any():
        bad = np.isnan(conf).any(axis=0).sum()
        raise ValueError(f"probs give NaN confidences for {bad} sample(s); thresholds would be undefined")
    return _search_thresholds(conf, _check_shares(shares, conf.shape[0]))


def stops_at_exit(confidence, threshold) -> np.ndarray:
    """Whether a sample stops at an exit: its confidence reaches the threshold, or is NaN.

    A NaN confidence stops the sample too (the cascade cannot decide past it), but such a
    sample is undecided, never assigned to the exit. The one rule both the simulated and
    the real early exit apply.
    """
    conf = np.asarray(confidence, dtype=np.float32)
    return np.isnan(conf) | (conf >= np.asarray(threshold, dtype=np.float64))


def _route(conf: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exit index, -1 if undecided) and the exit at which each sample stopped."""
    n_exits, n = conf.shape
    nan = np.isnan(conf)
    stop_mask = stops_at_exit(conf, thr[:, None])
    stopped = stop_mask.any(axis=0)
    first = np.argmax(stop_mask, axis=0)
    decided = stopped & ~nan[first, np.arange(n)]
    stop = np.where(stopped, first, n_exits - 1)
    return np.where(decided, first, -1), stop


def _expected_cost(stop: np.ndarray, flops: np.ndarray) -> float:
    return float(np.bincount(stop, minlength=flops.size) @ flops / stop.size)


def exit_indices(probs_or_conf, thresholds, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    """Exit each sample leaves at: the first k with confidence >= thresholds[k].

    -1 where a NaN confidence is met before an exit is found, or where no exit's threshold
    is met (possible only when the last threshold is not -1e8).
    """
    conf = _conf32(probs_or_conf, policy)
    return _route(conf, check_thresholds(thresholds, conf.shape[0]))[0]


def dynamic_evaluate(probs, targets, cumulative_flops, thresholds, policy: ExitPolicy = MAX_SOFTMAX) -> DynamicResult:
    """The release's dynamic evaluation: route every sample, score it at its exit."""
    probs = _check_probs(probs)
    n_exits, n, _ = probs.shape
    targets = _check_targets(targets, n)
    flops = _check_flops(cumulative_flops, n_exits)
    conf = _conf32(probs, policy)
    index, stop = _route(conf, check_thresholds(thresholds, n_exits))
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
        costs.append(_expected_cost(_route(conf, thr.astype(np.float64))[1], flops))
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
    conf = _conf32(_check_distributions(_check_probs(probs)), policy)
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
    probs = _check_distributions(_check_probs(probs))
    conf = _conf32(probs, policy)
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
        for index in (_route(conf, thr.astype(np.float64))[0] for thr in found)
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
    probs = _check_probs(probs)
    calib = probs if calib_probs is None else _check_probs(calib_probs, "calib_probs")
    n_exits = probs.shape[0]
    if calib.shape[0] != n_exits:
        raise ValueError(f"calib_probs has {calib.shape[0]} exits but probs has {n_exits}")
    out = []
    for p in release_p_values():
        thr = find_thresholds(calib, exit_shares(p, n_exits), policy)
        result = dynamic_evaluate(probs, targets, cumulative_flops, thr, policy)
        out.append(SweepPoint(float(p), thr, result.accuracy, result.expected_flops))
    return out

