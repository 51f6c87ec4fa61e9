"""One SGD step on the same data moves the weights of both backends of a pair the same way."""
from __future__ import annotations

import numpy as np
import pytest

from dvt_shared.error_bounds import computation_blocks
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import TARGET_PARAMS

CASE = harness.Case("dvt_t2t_vit_fmnist")
NO_DROPOUT = dict(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, stem_drop_rate=0.0)
LEARNING_RATE = 0.1
BATCH = 8


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_one_sgd_step(target, pair):
    ref, cand = pair.on(target)
    ref_model = harness.reference_model(CASE, seed=7, **NO_DROPOUT).train()
    cand_model = cand.twin(ref_model)
    before = ref.adapter.canonical(ref_model)
    config = ref_model.config
    x = harness.images(config, BATCH, seed=8)
    y = np.random.default_rng(9).integers(0, config.num_classes, BATCH)

    ref_loss = ref.adapter.sgd_step(ref_model, x, y, LEARNING_RATE, "multi_exit", ref.device)
    cand_loss = cand.adapter.sgd_step(cand_model, x, y, LEARNING_RATE, "multi_exit", cand.device)

    loss_delta = abs(cand_loss - ref_loss)
    after_ref, after_cand = ref.adapter.canonical(ref_model), cand.adapter.canonical(cand_model)
    step = max(harness.max_abs_delta(after_ref[k], before[k]) for k in before)
    deltas = {key: harness.max_abs_delta(after_cand[key], after_ref[key]) for key in after_ref}
    worst = max(deltas, key=deltas.get)
    blocks = computation_blocks(config)
    bound = target.step_bound(blocks, LEARNING_RATE, step)
    loss_bound = target.logit_bound(blocks, ref_loss)
    ok = deltas[worst] <= bound and loss_delta <= loss_bound
    record(
        f"train step {pair.id}", CASE.name, target.name, f"SGD lr {LEARNING_RATE}, largest update {step:.2e}",
        f"max |dw| {deltas[worst]:.2e} ({worst}), |dloss| {loss_delta:.1e}", f"{bound:.1e}, {loss_bound:.1e}", ok,
    )
    assert step > 100 * bound, f"the step barely moved the weights ({step:.2e}); the check would be vacuous"
    if not ok:
        fresh = harness.reference_model(CASE, seed=7, **NO_DROPOUT)
        where = harness.first_divergence(ref, cand, fresh, cand.twin(fresh), x, loss_bound)
        pytest.fail(
            f"after one step the weights differ by up to {deltas[worst]:.3e} (bound {bound:.1e}) at "
            f"{worst}; the losses by {loss_delta:.3e}; first divergent layer of the forward pass: {where}"
        )
