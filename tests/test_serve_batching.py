"""Stage-level batching across requests (dvt_serve.batching), on every backend: each image's class and
exit are what the engine gives it alone, whatever shares its batches, and the queues behave as documented."""
import asyncio
import time

import numpy as np
import pytest

from dvt_serve.batching import QueueFull, StageBatcher
from dvt_shared.error_bounds import FP32, decision_agreement
from dvt_shared.exit_policy import MAX_SOFTMAX, softmax
from tests.bounds import assert_chosen_close
from tests.test_engine import case, engine  # noqa: F401  (the module fixture and the twin-engine helper)


def run(coroutine):
    return asyncio.run(coroutine)


async def submit_all(batcher, images, sizes, spacing_s=0.0):
    """Requests of `sizes` images each, sent `spacing_s` apart, answered concurrently; then the batcher closes."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    async def one(i, start, size):
        await asyncio.sleep(i * spacing_s)
        return await batcher.submit(images[start:start + size])

    results = await asyncio.gather(*(one(i, s, n) for i, (s, n) in enumerate(zip(starts, sizes))))
    await batcher.close()
    return results


def joined(results, field):
    return np.concatenate([getattr(r, field) for r in results])


def test_decisions_are_the_engines_alone_whatever_shares_the_batch(case, backend):  # noqa: F811
    check_against_alone(case, backend, "stage")


def test_cascade_batching_decides_as_the_engine_alone(case):  # noqa: F811
    """The simpler scheme is the engine's own `predict` per batch, alike on every backend (test_engine.py)."""
    from tests.backends import adapter

    check_against_alone(case, adapter("torch"), "cascade")


def check_against_alone(case, backend, batching):  # noqa: F811
    model, images, all_exit, probs, thresholds = case
    images = images.numpy()[:200]
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, size=60)
    sizes = sizes[np.cumsum(sizes) <= len(images)]
    n = int(sizes.sum())
    # one engine for both runs, on one gear that every batch is padded up to: MindSpore compiles each stage once
    alone = engine(backend, model, thresholds, max_batch=8, gears=(8,))
    single = [alone.predict(images[i:i + 1]) for i in range(n)]
    batcher = StageBatcher(alone, max_batch=8, max_wait_s=0.002, batching=batching)
    results = run(submit_all(batcher, images, sizes, spacing_s=0.001))
    exits = joined(results, "exit_index")
    conf = probs.max(-1)[:, :n]
    margins = MAX_SOFTMAX.margin(FP32.exit_bounds(model.config.depth, all_exit[:, :n]))
    agreement = decision_agreement(conf, exits, thresholds, margins)
    assert agreement.unexplained.size == 0, f"images {agreement.unexplained[:10]} exit differently, none borderline"
    same = exits == np.array([p.exit_index[0] for p in single])
    assert same.sum() >= n - agreement.borderline
    assert_chosen_close(joined(results, "logits")[same], np.concatenate([p.logits for p in single])[same],
                        exits[same], model.config.depth)
    np.testing.assert_array_equal(joined(results, "macs"), alone.exit_macs[exits])
    stats = batcher.stats
    assert sum(stats.exits) == n and stats.images[0] == n and batcher.held == 0
    assert set(np.unique(exits)) == {0, 1, 2}
    if batching == "stage":
        # survivors of different requests ran together: fewer later-stage batches than requests reaching them
        reached = sum(int((r.exit_index != 0).any()) for r in results)
        assert stats.batches[1] < reached, (stats.batches, reached)
        assert stats.images[1] == int((exits != 0).sum())
    else:
        assert len(stats.batches) == 1


def test_a_full_batch_runs_at_once_and_a_lone_image_after_the_wait(case):  # noqa: F811
    from tests.backends import adapter

    model, images, _, _, thresholds = case
    images = images.numpy()
    torch_backend = adapter("torch")

    async def timed(batcher, batch):
        start = time.monotonic()
        await batcher.submit(batch)
        elapsed = time.monotonic() - start
        await batcher.close()
        return elapsed

    first_exit_only = [-1e8, -1e8, -1e8]
    full = StageBatcher(engine(torch_backend, model, first_exit_only), max_batch=8, max_wait_s=30.0)
    assert run(timed(full, images[:8])) < 10.0
    lone = StageBatcher(engine(torch_backend, model, first_exit_only), max_batch=8, max_wait_s=0.2)
    assert 0.2 <= run(timed(lone, images[:1])) < 10.0


def test_a_full_queue_refuses_then_accepts_again(case):  # noqa: F811
    from tests.backends import adapter

    model, images, _, _, thresholds = case
    images = images.numpy()
    batcher = StageBatcher(engine(adapter("torch"), model, thresholds), max_batch=4, max_wait_s=0.05, max_queue=6)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(images[:5]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue limit of 6"):
            await batcher.submit(images[5:7])
        done = await first
        again = await batcher.submit(images[5:7])
        await batcher.close()
        with pytest.raises(QueueFull, match="shutting down"):
            await batcher.submit(images[:1])
        return done, again

    done, again = run(scenario())
    assert len(done.exit_index) == 5 and len(again.exit_index) == 2
    assert batcher.stats.rejected == 2 and batcher.held == 0


def test_a_failing_batch_fails_its_requests_only(case):  # noqa: F811
    from tests.backends import adapter

    model, images, _, _, thresholds = case
    images = images.numpy()
    stage_engine = engine(adapter("torch"), model, thresholds)
    run_stage = stage_engine.run_stage
    calls = []

    def flaky(index, batch, state):
        calls.append(index)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return run_stage(index, batch, state)

    stage_engine.run_stage = flaky
    batcher = StageBatcher(stage_engine, max_batch=4, max_wait_s=0.0)

    async def scenario():
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.submit(images[:3])
        result = await batcher.submit(images[3:6])
        await batcher.close()
        return result

    result = run(scenario())
    assert batcher.stats.failed == 3 and batcher.held == 0
    np.testing.assert_array_equal(result.exit_index, stage_engine.predict(images[3:6]).exit_index)


def test_the_observer_sees_every_batch(case):  # noqa: F811
    from tests.backends import adapter

    model, images, _, _, thresholds = case
    seen = []
    batcher = StageBatcher(engine(adapter("torch"), model, thresholds), max_batch=8, max_wait_s=0.001,
                           observer=lambda stage, size, waits, exits: seen.append((stage, size, len(waits), exits)))
    results = run(submit_all(batcher, images.numpy(), [5, 7, 3, 8]))
    assert sum(size for stage, size, _, _ in seen if stage == 0) == 23
    assert all(size == waits for _, size, waits, _ in seen)
    exits = np.concatenate([e for *_, e in seen])
    np.testing.assert_array_equal(np.bincount(exits, minlength=3), np.bincount(joined(results, "exit_index"),
                                                                               minlength=3))
    np.testing.assert_allclose(softmax(joined(results, "logits")).max(-1), joined(results, "confidence"), rtol=1e-5)
