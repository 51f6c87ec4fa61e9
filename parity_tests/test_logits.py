"""Per-exit logits of every registered config and both release fixtures agree across the backends."""
from __future__ import annotations

import pytest

from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import TARGET_PARAMS

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
    tolerance = target.logits_tolerance(case.release_size)

    reference = harness.torch_outputs(torch_model, x, target.torch_device)
    outputs = harness.mindspore_outputs(ms_model, x)
    assert len(outputs) == len(reference) == config.num_exits

    failures = []
    for index, (ours, theirs) in enumerate(zip(outputs, reference)):
        delta = harness.max_abs_delta(ours, theirs)
        ok = delta <= tolerance
        record("logits", case.name, target.name, f"exit {index}", f"{delta:.2e}", f"{tolerance:.0e}", ok)
        record_property(f"max_abs_delta_exit{index}", delta)
        if not ok:
            failures.append(
                f"exit {index}: max |delta logit| {delta:.3e} > {tolerance:.0e}, worst sample "
                f"{harness.worst_sample(ours, theirs)}"
            )
    if failures:
        where = harness.first_divergence(torch_model, ms_model, x, tolerance, target.torch_device)
        pytest.fail(f"{case.name} on {target.name}: " + "; ".join(failures) + f"; first divergent layer: {where}")


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", harness.CASCADES)
def test_fixture_matches_release_logits(name, target):
    """The MindSpore backend alone reproduces the logits the release itself computed."""
    target.activate()
    case = harness.Case(name, fixture=True)
    ms_model = harness.mindspore_twin(harness.torch_model(case))
    io = harness.fixture_io(name)
    tolerance = target.logits_small
    for index, ours in enumerate(harness.mindspore_outputs(ms_model, io["images"])):
        delta = harness.max_abs_delta(ours, io[f"exit{index}"])
        ok = delta <= tolerance
        record("vs release", name, target.name, f"exit {index}", f"{delta:.2e}", f"{tolerance:.0e}", ok)
        assert ok, (
            f"{name} exit {index}: MindSpore differs from the release's logits by {delta:.3e} > {tolerance:.0e} "
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
    where = harness.first_divergence(torch_model, ms_model, x, 1e-5)
    assert where.startswith("less_token.blocks.1 tokens"), where
