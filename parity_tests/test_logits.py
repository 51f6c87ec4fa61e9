"""Per-exit logits of every registered config and both release fixtures agree across the backends."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from dvt_shared.error_bounds import FP32, computation_blocks
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import CPU, TARGET_PARAMS

CASES = [pytest.param(case, id=case.name) for case in harness.cases()]


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_exit_logits(case, target, record_property):
    target.activate()
    torch_model = harness.torch_model(case)
    ms_model = harness.mindspore_twin(torch_model)
    config = torch_model.config
    if case.fixture:
        x = harness.fixture_io(case.name)["images"]
    else:
        x = harness.images(config, case.batch, seed=1)
    reference = harness.torch_outputs(torch_model, x, target.torch_device)
    outputs = harness.mindspore_outputs(ms_model, x)
    assert len(outputs) == len(reference) == config.num_exits

    failures = []
    for index, (ours, theirs) in enumerate(zip(outputs, reference)):
        delta = harness.max_abs_delta(ours, theirs)
        bound = target.logit_bound(computation_blocks(config, index), theirs)
        ok = delta <= bound
        record("logits", case.name, target.name, f"exit {index}", f"{delta:.2e}", f"{bound:.1e}", ok)
        record_property(f"max_abs_delta_exit{index}", delta)
        if not ok:
            failures.append(
                f"exit {index}: max |delta logit| {delta:.3e} > {bound:.2e}, worst sample "
                f"{harness.worst_sample(ours, theirs)}"
            )
    if failures:
        bound = target.logit_bound(computation_blocks(config), reference[-1])
        where = harness.first_divergence(torch_model, ms_model, x, bound, target.torch_device)
        pytest.fail(f"{case.name} on {target.name}: " + "; ".join(failures) + f"; first divergent layer: {where}")


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", harness.CASCADES)
def test_fixture_matches_release_logits(name, target):
    """The MindSpore backend alone reproduces the logits the release itself computed."""
    target.activate()
    case = harness.Case(name, fixture=True)
    ms_model = harness.mindspore_twin(harness.torch_model(case))
    io = harness.fixture_io(name)
    for index, ours in enumerate(harness.mindspore_outputs(ms_model, io["images"])):
        delta = harness.max_abs_delta(ours, io[f"exit{index}"])
        bound = target.logit_bound(computation_blocks(ms_model.config, index), io[f"exit{index}"])
        ok = delta <= bound
        record("vs release", name, target.name, f"exit {index}", f"{delta:.2e}", f"{bound:.1e}", ok)
        assert ok, (
            f"{name} exit {index}: MindSpore differs from the release's logits by {delta:.3e} > {bound:.2e} "
            f"(worst sample {harness.worst_sample(ours, io[f'exit{index}'])})"
        )


def test_divergence_is_located():
    """The diagnosis names the layer that was broken on purpose, not a later one."""
    case = harness.Case("dvt_t2t_vit_fmnist")
    torch_model = harness.torch_model(case, depth=2, embed_dim=24, num_heads=2, token_dim=8)
    ms_model = harness.mindspore_twin(torch_model)
    fc1 = ms_model.less_token.blocks[1].mlp.fc1.weight
    fc1.set_data(fc1 * 1.01)
    x = harness.images(torch_model.config, 2, seed=3)
    where = harness.first_divergence(torch_model, ms_model, x, FP32.bound(computation_blocks(torch_model.config), 1.0))
    assert where.startswith("less_token.blocks.1 tokens"), where


# Both backends in float64 compute the same function to rounding: every constant, scalar and kernel in float64.
FLOAT64_RELATIVE_BOUND = 1e-12
# Release-size configs run one image at half the size here, in the slow set: every layer and code path is the
# same at any size, and float64 at 224x224 costs half a minute per model (its figures are in the README).
FLOAT64_SMALL_SIZE = 112


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.release_size else []) for case in harness.cases()
])
def test_float64_exit_logits(case):
    """PyTorch and MindSpore run in float64 on the same weights agree to 1e-12 of the largest logit on
    every exit, for every registered config and both release cascades: no kernel choice reaches that far."""
    CPU.activate()
    overrides = {"img_size": FLOAT64_SMALL_SIZE} if case.release_size else {}
    torch_model = harness.torch_model(case, **overrides)
    ms_model = harness.mindspore_twin(torch_model).to(ms.float64)
    if case.fixture:
        x = harness.fixture_io(case.name)["images"]
    else:
        x = harness.images(torch_model.config, 1 if case.release_size else case.batch, seed=1)
    reference = harness.torch_outputs(torch_model.double(), x.astype(np.float64))
    outputs = harness.mindspore_outputs(ms_model, x.astype(np.float64))
    for index, (ours, theirs) in enumerate(zip(outputs, reference)):
        assert ours.dtype == theirs.dtype == np.float64
        relative = harness.max_abs_delta(ours, theirs) / float(np.abs(theirs).max())
        ok = relative <= FLOAT64_RELATIVE_BOUND
        record("float64 logits", case.name, "cpu", f"exit {index}", f"{relative:.1e} relative", "1e-12", ok)
        assert ok, f"{case.name} exit {index}: float64 backends differ by {relative:.2e} of the largest logit"
