"""The exit rule of a DVT cascade, defined once: confidences under an exit policy, and where a sample stops.

A sample stops at the first exit whose confidence reaches its threshold; every decision is taken on
float32 confidences, as in the published release, whose softmax outputs are float32 tensors. What a
confidence is comes from an `ExitPolicy`: the release's maximum softmax probability (`MAX_SOFTMAX`, the
default everywhere) or one minus the normalised entropy (`ENTROPY`). The engines, `dvt calibrate`, `dvt
predict` and the parity tests take the policy as one object, whose `margin` turns a logit bound into the
distance from a threshold within which two runs may route a sample differently. Finding thresholds and
the simulated evaluation are `dvt_shared.calibration`'s.

Departures from the release, where it fails silently: a NaN confidence is never routed (the sample gets
exit index -1 and is reported), and invalid inputs raise ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# The release's thresholds meaning "nobody leaves here" and "everybody left leaves here".
NO_EXIT = np.float32(1e8)


ALL_EXIT = np.float32(-1e8)




def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; float inputs keep their dtype."""
    x = np.asarray(logits)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    # Shifting by the max keeps exp from overflowing without changing the result.
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def check_probs(probs, name: str = "probs") -> np.ndarray:
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
        return self.score(check_probs(probs)).astype(np.float32)

    def scores_from_logits(self, logits) -> np.ndarray:
        """float32 confidences of one exit's logits (n_samples, n_classes), as an engine takes its decision."""
        return self.score(softmax(np.asarray(logits).astype(np.float32), axis=-1)).astype(np.float32)

    def margin(self, logit_bound):
        """The decision margin of a logit bound: two runs whose logits differ by at most the bound give
        confidences within lipschitz x bound of each other, so a threshold between them lies within half
        of that of one of them; samples that close to a threshold may route either way."""
        return np.asarray(logit_bound, dtype=np.float64) * self.lipschitz / 2


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


def confidences(probs, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    """(n_exits, n_samples) confidence of every exit under `policy` (default: its maximum softmax probability)."""
    return policy.score(check_probs(probs))


def predictions(probs) -> np.ndarray:
    """(n_exits, n_samples) predicted class of every exit."""
    return check_probs(probs).argmax(axis=-1)


def float32_confidences(probs_or_conf, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
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


def stops_at_exit(confidence, threshold) -> np.ndarray:
    """Whether a sample stops at an exit: its confidence reaches the threshold, or is NaN.

    A NaN confidence stops the sample too (the cascade cannot decide past it), but such a
    sample is undecided, never assigned to the exit. The one rule both the simulated and
    the real early exit apply.
    """
    conf = np.asarray(confidence, dtype=np.float32)
    return np.isnan(conf) | (conf >= np.asarray(threshold, dtype=np.float64))


def route(conf: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exit index, -1 if undecided) and the exit at which each sample stopped."""
    n_exits, n = conf.shape
    nan = np.isnan(conf)
    stop_mask = stops_at_exit(conf, thr[:, None])
    stopped = stop_mask.any(axis=0)
    first = np.argmax(stop_mask, axis=0)
    decided = stopped & ~nan[first, np.arange(n)]
    stop = np.where(stopped, first, n_exits - 1)
    return np.where(decided, first, -1), stop


def exit_indices(probs_or_conf, thresholds, policy: ExitPolicy = MAX_SOFTMAX) -> np.ndarray:
    """Exit each sample leaves at: the first k with confidence >= thresholds[k].

    -1 where a NaN confidence is met before an exit is found, or where no exit's threshold
    is met (possible only when the last threshold is not -1e8).
    """
    conf = float32_confidences(probs_or_conf, policy)
    return route(conf, check_thresholds(thresholds, conf.shape[0]))[0]
