"""Stage-level batching across requests, framework-neutral: what `dvt serve` runs inside each replica.

Every stage has its own queue. The first stage runs when its queue holds `max_batch` images or its
oldest image has waited `max_wait_s`, a later stage whenever it holds survivors; of the ready stages,
the one whose oldest image has waited longest runs first. Under load the worker is busy anyway, so a
later stage, which sees only the survivors, keeps filling while earlier stages run: its batches grow
with the load instead of running nearly empty (with the deepest ready stage first, the shipped
Fashion-MNIST DVT served 1241 images/s with mean batches [32, 11.6, 3.1]; with this rule 1450 images/s
with [32, 26.5, 12.3], benchmarks/serve_load.py, 32 images per request; measured before later stages
stopped waiting max_wait_s). After a stage (`AdaptiveEngine.step`, the step `predict` loops too), the
images that stop answer at once and the others, with their reuse state, join the next stage's queue beside
other requests' survivors, kept as the backend's tensors (images enter the backend once, at their first
stage). Each image's decision is the exit policy on its own logits (`AdaptiveEngine.decide`), so whatever
shares its batch changes its logits by rounding only, never its rule. The batcher only calls the engine's
public stage contract and never changes its settings: an engine for it is built with max_batch >= the
batcher's.

`batching="cascade"` is the simpler scheme, for comparison: the requests queued together run the whole
cascade as one batch (`AdaptiveEngine.predict`), whose later stages get only that batch's survivors.

Compute runs on one worker thread, in order; the queues live on the caller's asyncio loop.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dvt_shared.adaptive import AdaptiveEngine, Prediction

from .spec import serve_default

BATCHING = ("stage", "cascade")


class QueueFull(RuntimeError):
    """The batcher holds `max_queue` images already (or is closing): the caller should retry later."""


@dataclass(eq=False)
class _Request:
    """One caller's images, filled in as they stop."""

    future: asyncio.Future
    logits: np.ndarray
    exit_index: np.ndarray
    confidence: np.ndarray
    macs: np.ndarray
    left: int


@dataclass(eq=False)
class _Group:
    """Rows waiting at one stage together: one request's images, or the survivors of one batch."""

    images: Any  # (m, C, H, W) float32: NumPy at the first stage, then the engine's tensors
    state: Any  # the engine's reuse state of these rows; None at the first stage
    owners: list[tuple[_Request, int]]  # (request, its row) of every row
    since: np.ndarray  # (m,) monotonic time each row joined this queue

    def split(self, engine: AdaptiveEngine, rows: int) -> tuple[_Group, _Group]:
        head, tail = np.arange(rows), np.arange(rows, len(self.owners))
        if isinstance(self.images, np.ndarray):
            images = self.images[:rows], self.images[rows:]
        else:
            images = engine.take(self.images, head), engine.take(self.images, tail)
        state = (None, None) if self.state is None else (
            engine.take_state(self.state, head), engine.take_state(self.state, tail))
        return (_Group(images[0], state[0], self.owners[:rows], self.since[:rows]),
                _Group(images[1], state[1], self.owners[rows:], self.since[rows:]))


@dataclass
class BatcherStats:
    """Counts since the batcher started; the server reports them and its metrics read them."""

    batches: list[int]  # per stage: batches run
    images: list[int]  # per stage: images run
    wait_s: list[float]  # per stage: summed queue wait of those images
    run_s: list[float]  # per stage: time its batches took on the worker (cascade batching: whole batches)
    exits: list[int]  # per exit: images that left there (undecided ones at the last)
    rejected: int = 0  # images refused with QueueFull
    failed: int = 0  # images whose batch raised

    def mean_batch(self) -> list[float]:
        return [i / b if b else 0.0 for i, b in zip(self.images, self.batches)]

    def as_dict(self) -> dict:
        return {
            "stage_batches": self.batches, "stage_images": self.images, "mean_batch": self.mean_batch(),
            "mean_wait_ms": [1e3 * w / i if i else 0.0 for w, i in zip(self.wait_s, self.images)],
            "mean_run_ms": [1e3 * r / b if b else 0.0 for r, b in zip(self.run_s, self.batches)],
            "exits": self.exits, "rejected": self.rejected, "failed": self.failed,
        }


@dataclass
class _Step:
    """What one stage run decided, handed from the worker thread back to the loop."""

    group: _Group
    logits: np.ndarray
    stops: np.ndarray
    exits: np.ndarray
    confidence: np.ndarray
    macs: np.ndarray
    error: BaseException | None = None
    survivors: _Group | None = field(default=None)


class StageBatcher:
    """`await StageBatcher(engine, ...).submit(images)` -> the `Prediction` of those images.

    engine: an `AdaptiveEngine` of any backend (its gears, if any, pad each stage's batch), built with a
        max_batch of at least the batcher's (its settings are never changed here).
    max_batch: the most images a stage runs at once.
    max_wait_s: how long the oldest image of a stage's queue waits for a fuller batch.
    max_queue: the most images held (queued or running, all stages); beyond it `submit` raises QueueFull.
    batching: "stage" (queues per stage) or "cascade" (each batch runs the whole cascade).
    observer: called on the loop after each batch with (stage, batch size, queue waits in s, exits of
        the images that stopped); the server's metrics hang here.
    """

    def __init__(
        self, engine: AdaptiveEngine, max_batch: int = serve_default("max_batch"),
        max_wait_s: float = serve_default("max_wait_ms") / 1e3, max_queue: int = serve_default("max_queue"),
        batching: str = serve_default("batching"),
        observer: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None,
    ):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_s >= 0; "
                             f"got {max_batch}, {max_queue}, {max_wait_s}")
        if engine.max_batch < max_batch:
            raise ValueError(f"the engine runs at most {engine.max_batch} images at once, fewer than the batcher's "
                             f"max_batch {max_batch}: build the engine with max_batch={max_batch}")
        self.engine, self.max_batch, self.max_wait_s, self.max_queue = engine, max_batch, max_wait_s, max_queue
        self.batching, self.observer = batching, observer
        stages = engine.config.num_exits if batching == "stage" else 1
        self._queues: list[deque[_Group]] = [deque() for _ in range(stages)]
        self._queued = [0] * stages
        self.stats = BatcherStats([0] * stages, [0] * stages, [0.0] * stages, [0.0] * stages,
                                  [0] * engine.config.num_exits)
        self.held = 0  # images admitted and not answered
        self._closing = False
        self._wakeup: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvt-stage")

    async def submit(self, images: np.ndarray) -> Prediction:
        """Classify `images` (n, C, H, W) float32, already checked and normalised."""
        n = len(images)
        if self._closing:
            raise QueueFull("the server is shutting down")
        if self.held + n > self.max_queue:
            self.stats.rejected += n
            raise QueueFull(f"{self.held} images are queued; {n} more would exceed the queue limit of "
                            f"{self.max_queue}")
        self._start()
        loop = asyncio.get_running_loop()
        classes = self.engine.config.num_classes
        request = _Request(
            loop.create_future(), np.empty((n, classes), np.float32), np.full(n, -1, np.int64),
            np.full(n, np.nan, np.float32), np.zeros(n, np.int64), n,
        )
        self.held += n
        self._queues[0].append(_Group(images, None, [(request, i) for i in range(n)], np.full(n, time.monotonic())))
        self._queued[0] += n
        self._wakeup.set()
        return await request.future

    async def close(self) -> None:
        """Refuse new images, answer every held one, then stop the worker."""
        self._closing = True
        while self.held and self._scheduler is not None and not self._scheduler.done():
            await asyncio.sleep(0.005)
        if self._scheduler is not None:
            self._scheduler.cancel()
        self._worker.shutdown(wait=True)

    def _start(self) -> None:
        if self._scheduler is None or self._scheduler.done():
            self._wakeup = asyncio.Event()
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    @property
    def full(self) -> bool:
        """Whether the batcher holds max_queue images: a server refuses a request before reading it."""
        return self.held >= self.max_queue

    def _ready_stage(self, now: float) -> int | None:
        """Of the stages that are ready (full; the first one once its oldest image has waited max_wait_s, a
        later one once it holds any), the one whose oldest image has waited longest (the deeper on a tie)."""
        # survivors waited for their first batch already: a later stage is ready as soon as it holds any
        ready = [k for k, queue in enumerate(self._queues) if self._queued[k] >= self.max_batch or (
            self._queued[k] and (k > 0 or now - queue[0].since[0] >= self.max_wait_s))]
        return min(ready, key=lambda k: (self._queues[k][0].since[0], -k)) if ready else None

    def _next_deadline(self) -> float | None:
        heads = [q[0].since[0] for q in self._queues if q]
        return min(heads) + self.max_wait_s if heads else None

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            k = self._ready_stage(now)
            if k is None:
                deadline = self._next_deadline()
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), None if deadline is None else max(deadline - now, 0))
                except asyncio.TimeoutError:
                    pass
                continue
            group = self._pop(k)
            started = time.monotonic()
            step = await loop.run_in_executor(self._worker, self._run, k, group)
            self._finish(k, step, started)

    def _pop(self, k: int) -> _Group:
        """Up to max_batch rows from the front of stage k's queue, as one group."""
        queue, parts, rows = self._queues[k], [], 0
        while queue and rows < self.max_batch:
            group = queue.popleft()
            if rows + len(group.owners) > self.max_batch:
                group, rest = group.split(self.engine, self.max_batch - rows)
                queue.appendleft(rest)
            parts.append(group)
            rows += len(group.owners)
        self._queued[k] -= rows
        if len(parts) == 1:
            return parts[0]
        images = [p.images for p in parts]
        numpy = all(isinstance(i, np.ndarray) for i in images)
        return _Group(
            np.concatenate(images) if numpy else self.engine.concat(images),
            None if parts[0].state is None else self.engine.concat_states([p.state for p in parts]),
            [o for p in parts for o in p.owners], np.concatenate([p.since for p in parts]),
        )

    def _run(self, k: int, group: _Group) -> _Step:
        """On the worker thread: stage k (or, batching "cascade", the whole cascade) on `group`."""
        engine = self.engine
        try:
            if self.batching == "cascade":
                p = engine.predict(group.images)
                return _Step(group, p.logits, np.ones(len(p.logits), bool), p.exit_index, p.confidence, p.macs)
            # images enter the backend at their first stage and stay there
            images = engine.to_backend(group.images) if k == 0 else group.images
            done = engine.step(k, images, group.state)
            step = _Step(group, done.logits, done.stops, done.exits, done.confidence,
                         np.full(len(done.logits), engine.exit_macs[k]))
            if done.survivors.size:
                step.survivors = _Group(done.images, done.state, [group.owners[i] for i in done.survivors],
                                        np.empty(done.survivors.size))
            return step
        except Exception as exc:  # the batch's requests get the error; the batcher goes on
            return _Step(group, None, None, None, None, None, error=exc)

    def _finish(self, k: int, step: _Step, started: float) -> None:
        group, n = step.group, len(step.group.owners)
        waits = started - group.since
        self.stats.batches[k] += 1
        self.stats.images[k] += n
        self.stats.wait_s[k] += float(waits.sum())
        self.stats.run_s[k] += time.monotonic() - started
        if step.error is not None:
            self.stats.failed += n
            for request, _ in group.owners:
                if not request.future.done():
                    request.future.set_exception(step.error)
                request.left -= 1
            self.held -= n
            return
        stopped = np.flatnonzero(step.stops)
        for row in stopped:
            request, i = group.owners[row]
            exit_at = int(step.exits[row])
            request.logits[i] = step.logits[row]
            request.exit_index[i] = exit_at
            request.confidence[i] = step.confidence[row]
            request.macs[i] = step.macs[row]
            self.stats.exits[exit_at if exit_at >= 0 else -1] += 1
            request.left -= 1
            if request.left == 0 and not request.future.done():
                request.future.set_result(
                    Prediction(request.logits, request.exit_index, request.confidence, request.macs))
        self.held -= stopped.size
        if step.survivors is not None:
            step.survivors.since[:] = time.monotonic()
            self._queues[k + 1].append(step.survivors)
            self._queued[k + 1] += len(step.survivors.owners)
        if self.observer is not None:
            self.observer(k, n, waits, step.exits[step.stops])
