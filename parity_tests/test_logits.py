"""Per-exit logits of every registered config and both release fixtures agree across the backends."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvt_shared.error_bounds import FP32, computation_blocks
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import CPU, TARGET_PARAMS

CASES = [pytest.param(case, id=case.name) for case in harness.cases()]


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_exit_logits(case, target, pair, record_property):
    ref, cand = pair.on(target)
    ref_model = harness.reference_model(case)
    cand_model = cand.twin(ref_model)
    config = ref_model.config
    if case.fixture:
        x = harness.fixture_io(case.name)["images"]
    else:
        x = harness.images(config, case.batch, seed=1)
    reference = ref.exits(ref_model, x)
    outputs = cand.exits(cand_model, x)
    assert len(outputs) == len(reference) == config.num_exits

    failures = []
    for index, (ours, theirs) in enumerate(zip(outputs, reference)):
        delta = harness.max_abs_delta(ours, theirs)
        bound = target.logit_bound(computation_blocks(config, index), theirs)
        ok = delta <= bound
        record(f"logits {pair.id}", case.name, target.name, f"exit {index}", f"{delta:.2e}", f"{bound:.1e}", ok)
        record_property(f"max_abs_delta_exit{index}", delta)
        if not ok:
            failures.append(
                f"exit {index}: max |delta logit| {delta:.3e} > {bound:.2e}, worst sample "
                f"{harness.worst_sample(ours, theirs)}"
            )
    if failures:
        bound = target.logit_bound(computation_blocks(config), reference[-1])
        where = harness.first_divergence(ref, cand, ref_model, cand_model, x, bound)
        pytest.fail(f"{case.name} on {target.name}: " + "; ".join(failures) + f"; first divergent layer: {where}")


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", harness.CASCADES)
def test_fixture_matches_release_logits(name, target, pair):
    """The candidate backend alone reproduces the logits the release itself computed."""
    _, cand = pair.on(target)
    case = harness.Case(name, fixture=True)
    cand_model = cand.twin(harness.reference_model(case))
    io = harness.fixture_io(name)
    for index, ours in enumerate(cand.exits(cand_model, io["images"])):
        delta = harness.max_abs_delta(ours, io[f"exit{index}"])
        bound = target.logit_bound(computation_blocks(cand_model.config, index), io[f"exit{index}"])
        ok = delta <= bound
        record(f"vs release, {cand.backend}", name, target.name, f"exit {index}", f"{delta:.2e}", f"{bound:.1e}", ok)
        assert ok, (
            f"{name} exit {index}: {cand.backend} differs from the release's logits by {delta:.3e} > {bound:.2e} "
            f"(worst sample {harness.worst_sample(ours, io[f'exit{index}'])})"
        )


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
def test_divergence_is_located(pair):
    """The diagnosis names the layer that was broken on purpose, not a later one."""
    ref, cand = pair.on(CPU)
    case = harness.Case("dvt_t2t_vit_fmnist")
    ref_model = harness.reference_model(case, depth=2, embed_dim=24, num_heads=2, token_dim=8)
    broken = harness.reference_model(case, depth=2, embed_dim=24, num_heads=2, token_dim=8)
    with torch.no_grad():
        broken.less_token.blocks[1].mlp.fc1.weight.mul_(1.01)
    cand_model = cand.twin(broken)
    x = harness.images(ref_model.config, 2, seed=3)
    bound = FP32.bound(computation_blocks(ref_model.config), 1.0)
    where = harness.first_divergence(ref, cand, ref_model, cand_model, x, bound)
    assert where.startswith("less_token.blocks.1 tokens"), where


# Both backends in float64 compute the same function to rounding: every constant, scalar and kernel in float64.
FLOAT64_RELATIVE_BOUND = 1e-12
# Release-size configs run one image at half the size here, in the slow set: every layer and code path is the
# same at any size, and float64 at 224x224 costs half a minute per model (its figures are in the README).
FLOAT64_SMALL_SIZE = 112


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.release_size else []) for case in harness.cases()
])
@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
def test_float64_exit_logits(case, pair):
    """The pair run in float64 on the same weights agrees to 1e-12 of the largest logit on every exit, for
    every registered config and both release cascades: no kernel choice reaches that far."""
    ref, cand = pair.on(CPU)
    overrides = {"img_size": FLOAT64_SMALL_SIZE} if case.release_size else {}
    ref_model = harness.reference_model(case, **overrides)
    cand_model = cand.adapter.float64(cand.twin(ref_model))
    if case.fixture:
        x = harness.fixture_io(case.name)["images"]
    else:
        x = harness.images(ref_model.config, 1 if case.release_size else case.batch, seed=1)
    reference = ref.exits(ref.adapter.float64(ref_model), x.astype(np.float64))
    outputs = cand.exits(cand_model, x.astype(np.float64))
    for index, (ours, theirs) in enumerate(zip(outputs, reference)):
        assert ours.dtype == theirs.dtype == np.float64
        relative = harness.max_abs_delta(ours, theirs) / float(np.abs(theirs).max())
        ok = relative <= FLOAT64_RELATIVE_BOUND
        record(f"float64 logits {pair.id}", case.name, "cpu", f"exit {index}", f"{relative:.1e} relative", "1e-12", ok)
        assert ok, f"{case.name} exit {index}: {pair.id} in float64 differ by {relative:.2e} of the largest logit"
