"""VT models agree across the backends of every pair: logits (and VT-FPN's per-level outputs) in eval mode
with converted BatchNorm statistics, and one SGD step in training mode.

Every registered VT name is checked; the ImageNet-size models at small inputs (the
layers are the same at any size, and a 224x224 ResNet in MindSpore's CPU kernels would
dominate the suite's time).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import dvt_torch
from dvt_shared.error_bounds import computation_blocks
from dvt_shared.models import get_model_config, list_model_names
from dvt_shared.vt import VTFPNConfig
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import CPU, TARGET_PARAMS

SMALL_INPUTS = {"vt_resnet18": {"img_size": 64}, "vt_resnet34": {"img_size": 64}, "vt_fpn_r50": {"img_size": (64, 96)}}
BATCH = 2
TRAIN_CASES = ("vt_resnet_fmnist", "resnet_fmnist")
TRAIN_BATCH = 8
LEARNING_RATE = 0.1
# Submodules compared when outputs differ, in the order they run.
TRACED = re.compile(
    r"^(conv1|layer\d|vt\.\d+|head|fc|lateral\.\d|tokenizers\.\d|transformer|projectors\.\d|classifier)$")


def config_of(name: str):
    return get_model_config(name, **SMALL_INPUTS.get(name, {}))


def randomise(model: torch.nn.Module, seed: int, noise: float = 0.02) -> None:
    """Seeded noise on every parameter, and BatchNorm statistics far from their initial 0 and 1,
    so that a missed or mis-named statistic shows. Affines keep their initial scale (zero for
    each block's last BatchNorm, plus noise): unit scales there would double the activations'
    variance at every block of a deep trunk."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def reference_model(config, seed: int = 0):
    """The config's model in the reference backend, with seeded random weights and statistics, eval mode."""
    torch.manual_seed(seed)
    model = dvt_torch.build_model(config).eval()
    randomise(model, seed + 1)
    return model


def images(config, batch: int, seed: int) -> np.ndarray:
    size = config.img_size if isinstance(config, VTFPNConfig) else (config.img_size, config.img_size)
    return np.random.default_rng(seed).standard_normal((batch, config.in_chans, *size)).astype(np.float32)


def outputs_of(config):
    """The function of (model, x) whose outputs are compared: the logits, and VT-FPN's levels too."""
    def run(model, x):
        if isinstance(config, VTFPNConfig):
            levels = model.forward_features(x)
            return [model.forward_head(levels), *levels]
        return [model(x)]
    return run


def output_labels(config) -> list[str]:
    if isinstance(config, VTFPNConfig):
        return ["logits"] + [f"level {i} (stride {4 << i})" for i in range(config.num_levels)]
    return ["logits"]


# The ResNet-34 and ResNet-50 trunks take MindSpore seconds to build and run: in the slow set.
OUTPUT_CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name in ("vt_resnet34", "vt_fpn_r50") else name
    for name in list_model_names(cascade=False)
]


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", OUTPUT_CASES)
def test_vt_outputs(name, target, pair):
    ref, cand = pair.on(target)
    config = config_of(name)
    ref_model = reference_model(config)
    cand_model = cand.twin(ref_model)
    x = images(config, BATCH, seed=1)
    run = outputs_of(config)
    reference, ours = ref.apply(ref_model, run, x), cand.apply(cand_model, run, x)
    blocks = computation_blocks(config)
    failures = []
    for label, theirs, mine in zip(output_labels(config), reference, ours):
        assert mine.shape == theirs.shape, (
            f"{name} {label}: {mine.shape} in {cand.backend} vs {theirs.shape} in {ref.backend}")
        bound = target.logit_bound(blocks, theirs)
        assert np.abs(theirs).max() > 100 * bound, f"{name} {label} is near zero; the check would be vacuous"
        delta = harness.max_abs_delta(mine, theirs)
        ok = delta <= bound
        record(f"VT outputs {pair.id}", name, target.name, label, f"{delta:.2e}", f"{bound:.1e}", ok)
        if not ok:
            failures.append(f"{label}: max |delta| {delta:.3e} > {bound:.2e}")
    if failures:
        where = harness.first_divergence(ref, cand, ref_model, cand_model, x, target.logit_bound(blocks, reference[0]),
                                         pattern=TRACED, fn=run)
        pytest.fail(f"{name} on {target.name}: " + "; ".join(failures) + f"; first divergent submodule: {where}")


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("name", ["vt_resnet_fmnist", "resnet_fmnist"])
def test_batchnorm_statistics_convert_both_ways(name, pair):
    """Running statistics (and every other tensor) reach the candidate and come back unchanged; the
    momentum convention (MindSpore's 1 - PyTorch's) is checked by its effect, in the SGD step test."""
    ref, cand = pair.on(CPU)
    ref_model = reference_model(config_of(name))
    reference = ref.adapter.canonical(ref_model)
    assert any(key.endswith("running_var") for key in reference)
    back = cand.adapter.canonical(cand.twin(ref_model))
    assert back.keys() == reference.keys()
    assert all(np.array_equal(back[key], reference[key]) for key in reference)


@pytest.mark.parametrize("pair", harness.PAIR_PARAMS)
@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_vt_one_sgd_step(name, target, pair):
    """Training mode (batch statistics, running-statistics update) and one SGD step move both the same way."""
    ref, cand = pair.on(target)
    config = config_of(name)
    ref_model = reference_model(config, seed=7).train()
    cand_model = cand.twin(ref_model)
    before = ref.adapter.canonical(ref_model)
    x = images(config, TRAIN_BATCH, seed=8)
    y = np.random.default_rng(9).integers(0, config.num_classes, TRAIN_BATCH)

    ref_loss = ref.adapter.sgd_step(ref_model, x, y, LEARNING_RATE, "cross_entropy", ref.device)
    cand_loss = cand.adapter.sgd_step(cand_model, x, y, LEARNING_RATE, "cross_entropy", cand.device)

    loss_delta = abs(cand_loss - ref_loss)
    after_ref, after_cand = ref.adapter.canonical(ref_model), cand.adapter.canonical(cand_model)
    deltas = {key: harness.max_abs_delta(after_cand[key], after_ref[key]) for key in after_ref}
    worst = max(deltas, key=deltas.get)
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k not in statistics]
    step = max(harness.max_abs_delta(after_ref[k], before[k]) for k in weights)
    moved = max(harness.max_abs_delta(after_ref[k], before[k]) for k in statistics)
    blocks = computation_blocks(config)
    # the running statistics move by (1 - momentum) x batch statistics: bounded like the forward pass
    bound = max(target.step_bound(blocks, LEARNING_RATE, step), target.logit_bound(blocks, moved))
    loss_bound = target.logit_bound(blocks, ref_loss)
    ok = deltas[worst] <= bound and loss_delta <= loss_bound
    record(
        f"VT train step {pair.id}", name, target.name, f"SGD lr {LEARNING_RATE}, largest update {step:.2e}",
        f"max |dw| {deltas[worst]:.2e} ({worst}), |dloss| {loss_delta:.1e}", f"{bound:.1e}, {loss_bound:.1e}", ok,
    )
    assert step > 100 * bound, f"the step barely moved the weights ({step:.2e}); the check would be vacuous"
    assert moved > 100 * bound, f"the running statistics barely moved ({moved:.2e})"
    assert ok, (
        f"after one step the tensors differ by up to {deltas[worst]:.3e} (bound {bound:.1e}) at {worst}; "
        f"the losses by {loss_delta:.3e}"
    )
