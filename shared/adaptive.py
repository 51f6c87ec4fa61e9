"""Real early exit, framework-neutral: the stage contract every backend's engine keeps, and the compaction
loop written once over it.

The contract (public, as einops' backends and Keras 3's `backend/` modules are): `to_backend` (a NumPy batch
as the backend's tensor), `run_stage` (one stage on a batch and its reuse state: the exit's logits as NumPy,
the only thing a decision needs, and the next state, kept as the backend's tensors), `take` and `take_state`
(rows of a batch and of a state), `concat` and `concat_states` (one batch of several groups' rows) and
`to_numpy`. On it, `step` runs a stage, decides with the engine's exit policy (dvt_shared.exit_policy) which
images leave and splits off the survivors with their state, still backend tensors; `predict` loops it and
scatters results back to input order, and the stage-level batcher (`dvt_serve.batching`) runs it on
batches of several requests. So every backend (PyTorch, MindSpore, ONNX Runtime) exits the same images at the
same exits by construction, and images never go back to NumPy between stages.
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
class StageStep:
    """What one stage decided for a batch (`AdaptiveEngine.step`), per row of that batch.

    logits, stops, exits, confidence: the exit's logits, whether each row stops there, the exit it is reported
    at (-1: undecided) and its confidence. survivors: the rows going on; images, state: theirs, as the backend's
    tensors (the batch itself where every row goes on; None where none does).
    """

    logits: np.ndarray
    stops: np.ndarray
    exits: np.ndarray
    confidence: np.ndarray
    survivors: np.ndarray
    images: Any = None
    state: Any = None


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

    # --- the stage contract: what a backend implements -------------------------------------------------

    @abstractmethod
    def num_images(self, images: Any) -> int:
        """Check a batch (the backend's tensor) as the model checks its input, and return its size."""

    @abstractmethod
    def run_stage(self, index: int, images: Any, state: Any) -> tuple[np.ndarray, Any]:
        """Logits of exit `index` as a float32 NumPy array (what the decision reads), and the reuse state for
        the next exit, kept as the backend's tensors."""

    @abstractmethod
    def take(self, images: Any, rows: np.ndarray) -> Any:
        """Rows `rows` of a batch of images."""

    @abstractmethod
    def take_state(self, state: Any, rows: np.ndarray) -> Any:
        """Rows `rows` of a reuse state."""

    @abstractmethod
    def concat(self, batches: list) -> Any:
        """One batch holding the rows of `batches` in order (the stage-level batcher joins requests)."""

    @abstractmethod
    def concat_states(self, states: list) -> Any:
        """One reuse state holding the rows of `states` in order."""

    def to_backend(self, images: np.ndarray) -> Any:
        """The backend's tensor of a NumPy batch (the batch itself where the backend runs on NumPy)."""
        return images

    def to_numpy(self, images: Any) -> np.ndarray:
        """A batch of the backend's as a NumPy array."""
        return np.asarray(images)

    # --- written once over the contract -----------------------------------------------------------------

    def step(self, index: int, images: Any, state: Any) -> StageStep:
        """Stage `index` on a batch: its logits, each row's decision, and the rows going on with their images
        and state (backend tensors; the batch as it is where every row goes on)."""
        logits, state = self.run_stage(index, images, state)
        stops, exits, conf = self.decide(index, logits)
        survivors = np.flatnonzero(~stops)
        if survivors.size == 0:
            images = state = None
        elif survivors.size < stops.size:
            images, state = self.take(images, survivors), self.take_state(state, survivors)
        return StageStep(logits, stops, exits, conf, survivors, images, state)

    def _chunks(self, images) -> tuple[Any, list[tuple[int, int]]]:
        """The batch as the backend's tensor, checked, and its `even_chunks` of at most max_batch rows."""
        if isinstance(images, np.ndarray):
            images = self.to_backend(images)
        return images, even_chunks(self.num_images(images), self.max_batch)

    def predict(self, images) -> Prediction:
        # bounded memory: big batches go through in even chunks of at most max_batch images
        images, chunks = self._chunks(images)
        if len(chunks) == 1:
            return self._predict_chunk(images, chunks[0][1])
        parts = [self._predict_chunk(self.take(images, np.arange(start, stop)), stop - start)
                 for start, stop in chunks]
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
            chunk = images if stop - start == n else self.take(images, np.arange(start, stop))
            logits, state = [], None
            for k in range(self.config.num_exits):
                exit_logits, state = self.run_stage(k, chunk, state)
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
            step = self.step(k, images, state)
            rows = active[step.stops]
            logits_out[rows] = step.logits[step.stops]
            exit_index[rows] = step.exits[step.stops]
            confidence[rows] = step.confidence[step.stops]
            macs[rows] = self.exit_macs[k]
            if step.survivors.size == 0:
                break
            active, images, state = active[step.survivors], step.images, step.state
        return Prediction(logits_out, exit_index, confidence, macs)
