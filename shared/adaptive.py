"""Real early exit, framework-neutral: the compaction loop every backend runs.

A backend supplies a few small operations (run one stage on a batch, take rows of the
images, take rows of the reuse state, make its tensor of a NumPy batch); this core decides
with the engine's exit policy (dvt_shared.exit_policy) which images leave at each exit, runs the
next stage on the others only, and scatters results back to input order. So every backend
(PyTorch, MindSpore, ONNX Runtime) exits the same images at the same exits by construction.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .configs import DVTConfig
from .exit_policy import MAX_SOFTMAX, ExitPolicy, check_thresholds, stops_at_exit
from .flops import cumulative_flops

DEFAULT_MAX_BATCH = 256


def power_of_two_gears(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `max_batch`, then `max_batch` itself: every batch up to it has a gear."""
    gears, size = [], 1
    while size < max_batch:
        gears.append(size)
        size *= 2
    return (*gears, max_batch)


def check_gears(gears, max_batch: int) -> tuple[int, ...]:
    """`gears` as a sorted tuple of distinct batch sizes, the largest at least `max_batch`."""
    try:
        sizes = sorted({int(g) for g in gears})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"gears must be batch sizes (integers >= 1), got {gears!r}") from exc
    if not sizes or sizes[0] < 1 or any(isinstance(g, bool) or int(g) != g for g in gears):
        raise ValueError(f"gears must be batch sizes (integers >= 1), got {gears!r}")
    if sizes[-1] < max_batch:
        raise ValueError(
            f"the largest gear, {sizes[-1]}, is below max_batch {max_batch}: bigger chunks would have none"
        )
    return tuple(sizes)


def gear_for(batch: int, gears: tuple[int, ...]) -> int:
    """The smallest gear that holds `batch` images (the batch is padded up to it)."""
    for gear in gears:
        if gear >= batch:
            return gear
    raise ValueError(f"a batch of {batch} exceeds the largest gear, {gears[-1]}")


def even_chunks(n: int, max_batch: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest chunks of at most `max_batch` rows that cover `n`, as even as they
    can be: 10,000 rows at 256 run as 40 chunks of 250, so a gear-padded backend compiles one shape
    instead of a second one for a tail of 16 rows."""
    if n < 1 or max_batch < 1:
        raise ValueError(f"need n >= 1 rows and max_batch >= 1, got n={n}, max_batch={max_batch}")
    count = -(-n // max_batch)
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def gear_pieces(batch: int, gears: tuple[int, ...]) -> list[tuple[int, int]]:
    """How `batch` rows run on fixed gears: (rows, gear) pieces in row order, each gear >= its rows.

    A batch is padded up to the next gear unless that pads more rows than splitting off the
    largest gear that fits leaves over; then that gear runs full and the rest is planned the
    same way. Each call has a fixed cost besides its rows, so neither always padding nor always
    splitting is best: simulated with a cost of (launch + rows) per call over batches 1-64 and
    powers-of-two gears, this rule spent 2-9% more than the best plan for launch costs of 0.25-20
    rows, where padding alone spent 1-29% more.
    """
    pieces = []
    while batch > 0:
        up = gear_for(batch, gears)
        down = max((g for g in gears if g <= batch), default=None)
        if down is None or up - batch <= batch - down:
            pieces.append((batch, up))
            break
        pieces.append((down, down))
        batch -= down
    return pieces


@dataclass(frozen=True, eq=False)
class Prediction:
    """Per image, in input order.

    logits: (n, classes) logits of the exit the image left at.
    exit_index: exit it left at; -1 where its confidence was NaN (undecided, reported).
    confidence: its confidence there, under the engine's exit policy.
    macs: multiply-adds spent on it (all stages it ran).
    """

    logits: np.ndarray
    exit_index: np.ndarray
    confidence: np.ndarray
    macs: np.ndarray

    @property
    def classes(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def gflops(self) -> np.ndarray:
        return self.macs / 1e9

    @property
    def undecided(self) -> int:
        return int((self.exit_index < 0).sum())


def reuse_tensor_names(config: DVTConfig, index: int) -> list[str]:
    """Names of the reuse tensors stage `index` hands on (none before the first stage or after the last).

    Exported stage graphs (ONNX, MindIR) take the previous stage's, named with a "prev_" prefix,
    and give their own, in this order.
    """
    if index < 0 or index == config.num_exits - 1:
        return []
    return [n for n, on in (("features", config.feature_reuse), ("relations", config.relation_reuse)) if on]


class AdaptiveEngine(ABC):
    """Early-exit classifier over a DVT of any backend; subclasses adapt one framework.

    `predict` and `all_exit_logits` take a NumPy batch or the backend's own tensor; an image stops at
    the first exit whose confidence under `exit_policy` reaches that exit's threshold.
    """

    def __init__(
        self, config: DVTConfig, thresholds, max_batch: int = DEFAULT_MAX_BATCH, exit_policy: ExitPolicy = MAX_SOFTMAX
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.config = config
        self.thresholds = check_thresholds(thresholds, config.num_exits)
        self.max_batch = max_batch
        self.exit_policy = exit_policy
        self.exit_macs = np.asarray(cumulative_flops(config), dtype=np.int64)

    def set_thresholds(self, thresholds) -> None:
        """Decide with `thresholds` (one per exit, checked as the constructor checks them) from the next call on.

        The engine keeps its stages: a new engine would compile its graphs (MindSpore, per gear) again.
        """
        self.thresholds = check_thresholds(thresholds, self.config.num_exits)

    @abstractmethod
    def _num_images(self, images: Any) -> int:
        """Validate the batch and return its size."""

    @abstractmethod
    def _run_stage(self, index: int, images: Any, state: Any) -> tuple[np.ndarray, Any]:
        """Logits of exit `index` as a float32 numpy array, and the state for the next exit."""

    @abstractmethod
    def _take(self, images: Any, rows: np.ndarray) -> Any:
        """Rows `rows` of a batch of images."""

    @abstractmethod
    def _take_state(self, state: Any, rows: np.ndarray) -> Any:
        """Rows `rows` of a reuse state."""

    @abstractmethod
    def _concat_states(self, states: list) -> Any:
        """One reuse state holding the rows of `states` in order: the stage-level batcher
        (dvt_shared.stage_batching) joins different requests' survivors into one batch."""

    def _from_numpy(self, images: np.ndarray) -> Any:
        """The backend's tensor of a NumPy batch (the batch itself where the backend runs on NumPy)."""
        return images

    def _slice(self, images: Any, start: int, stop: int) -> Any:
        return self._take(images, np.arange(start, stop))

    def _chunks(self, images) -> tuple[Any, list[tuple[int, int]]]:
        """The batch as the backend's tensor, checked, and its `even_chunks` of at most max_batch rows."""
        if isinstance(images, np.ndarray):
            images = self._from_numpy(images)
        return images, even_chunks(self._num_images(images), self.max_batch)

    def predict(self, images) -> Prediction:
        # bounded memory: big batches go through in even chunks of at most max_batch images
        images, chunks = self._chunks(images)
        if len(chunks) == 1:
            return self._predict_chunk(images, chunks[0][1])
        parts = [self._predict_chunk(self._slice(images, start, stop), stop - start) for start, stop in chunks]
        return Prediction(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("logits", "exit_index", "confidence", "macs"))
        )

    def all_exit_logits(self, images) -> np.ndarray:
        """(exits, n, classes) float32 logits of every exit for every image, through the stages
        `predict` runs (the same compiled graphs and gears), in `even_chunks` of at most max_batch."""
        images, chunks = self._chunks(images)
        n = chunks[-1][1]
        parts = []
        for start, stop in chunks:
            chunk = images if stop - start == n else self._slice(images, start, stop)
            logits, state = [], None
            for k in range(self.config.num_exits):
                exit_logits, state = self._run_stage(k, chunk, state)
                logits.append(exit_logits)
            parts.append(np.stack(logits))
        return np.concatenate(parts, axis=1)

    def decide(self, index: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image, from exit `index`'s logits alone: whether it stops there, the exit it is reported at
        (`index`, or -1 where its confidence is NaN), and its confidence under the engine's exit policy.

        At the last exit every image stops; one that met no threshold there is undecided (-1).
        """
        conf = self.exit_policy.scores_from_logits(logits)
        meets = stops_at_exit(conf, self.thresholds[index])
        stops = meets if index < self.config.num_exits - 1 else np.ones_like(meets)
        return stops, np.where(meets & ~np.isnan(conf), index, -1), conf

    def _predict_chunk(self, images, n: int) -> Prediction:
        last = self.config.num_exits - 1
        logits_out = np.empty((n, self.config.num_classes), dtype=np.float32)
        exit_index = np.full(n, -1, dtype=np.int64)
        confidence = np.full(n, np.nan, dtype=np.float32)
        macs = np.zeros(n, dtype=np.int64)
        active, state = np.arange(n), None
        for k in range(last + 1):
            logits, state = self._run_stage(k, images, state)
            stops, exits, conf = self.decide(k, logits)
            rows = active[stops]
            logits_out[rows] = logits[stops]
            exit_index[rows] = exits[stops]
            confidence[rows] = conf[stops]
            macs[rows] = self.exit_macs[k]
            going_on = np.flatnonzero(~stops)
            if going_on.size == 0:
                break
            # when nobody left, the batch goes on as it is; otherwise the rows going on are taken (a copy)
            if going_on.size < stops.size:
                active = active[going_on]
                images = self._take(images, going_on)
                state = self._take_state(state, going_on)
        return Prediction(logits_out, exit_index, confidence, macs)
