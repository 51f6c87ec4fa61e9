"""VT models agree across the backends: logits (and VT-FPN's per-level outputs) in eval mode
with converted BatchNorm statistics, and one SGD step in training mode.

Every registered VT name is checked; the ImageNet-size models at small inputs (the
layers are the same at any size, and a 224x224 ResNet in MindSpore's CPU kernels would
dominate the suite's time).
"""
from __future__ import annotations

import re

import mindspore as ms
import numpy as np
import pytest
import torch

import dvt_mindspore
from dvt_mindspore.convert import from_canonical as ms_from_canonical
from dvt_mindspore.convert import to_canonical as ms_to_canonical
from dvt_shared.vt import VTFPNConfig, get_vt_config, list_vt_configs
import dvt_torch
from dvt_torch.convert import to_canonical as torch_to_canonical
from dvt_shared.error_bounds import computation_blocks
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import TARGET_PARAMS

SMALL_INPUTS = {"vt_resnet18": {"img_size": 64}, "vt_resnet34": {"img_size": 64}, "vt_fpn_r50": {"img_size": (64, 96)}}
BATCH = 2
TRAIN_CASES = ("vt_resnet_fmnist", "resnet_fmnist")
TRAIN_BATCH = 8
LEARNING_RATE = 0.1
# Submodules compared when outputs differ, in the order they run.
TRACED = re.compile(r"^(conv1|layer\d|vt\.\d+|head|fc|lateral\.\d|tokenizers\.\d|transformer|projectors\.\d|classifier)$")


def config_of(name: str):
    return get_vt_config(name, **SMALL_INPUTS.get(name, {}))


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


def twins(config, seed: int = 0):
    """A PyTorch model with seeded random weights (eval mode) and its MindSpore twin."""
    torch.manual_seed(seed)
    model = dvt_torch.build_model(config).eval()
    randomise(model, seed + 1)
    twin = ms_from_canonical(dvt_mindspore.build_model(config), torch_to_canonical(model), source="the PyTorch model's weights")
    twin.set_train(False)
    return model, twin


def images(config, batch: int, seed: int) -> np.ndarray:
    size = config.img_size if isinstance(config, VTFPNConfig) else (config.img_size, config.img_size)
    return np.random.default_rng(seed).standard_normal((batch, config.in_chans, *size)).astype(np.float32)


def named_outputs(config, model, x) -> list[tuple[str, np.ndarray]]:
    """The logits, and for VT-FPN every level of `forward_features` as well."""
    if isinstance(config, VTFPNConfig):
        levels = model.forward_features(x)
        named = [(f"level {i} (stride {4 << i})", level) for i, level in enumerate(levels)]
        return [("logits", model.forward_head(levels))] + named
    return [("logits", model(x))]


def _arrays(value) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def first_divergence(torch_model, ms_model, x: np.ndarray, tolerance: float) -> str:
    """The first traced submodule, in execution order, whose outputs differ by more than `tolerance`."""
    torch_records, ms_records = [], {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: torch_records.append((n, out)))
               for n, m in torch_model.named_modules() if TRACED.match(n)]
    handles += [c.register_forward_hook(lambda _c, _i, out, n=n: ms_records.__setitem__(n, out))
                for n, c in ms_model.cells_and_names() if TRACED.match(n)]
    try:
        with torch.no_grad():
            torch_model(torch.from_numpy(x))
        ms_model(ms.Tensor(x))
    finally:
        for handle in handles:
            handle.remove()
    for name, output in torch_records:
        for part, (ours, theirs) in enumerate(zip(_arrays(ms_records[name]), _arrays(output))):
            delta = harness.max_abs_delta(ours.asnumpy(), theirs.detach().numpy())
            if not delta <= tolerance:
                return f"{name} output {part} (max |delta| {delta:.3e})"
    return "no traced submodule exceeds the tolerance"


# The ResNet-34 and ResNet-50 trunks take MindSpore seconds to build and run: in the slow set.
OUTPUT_CASES = [
    pytest.param(name, marks=pytest.mark.slow) if name in ("vt_resnet34", "vt_fpn_r50") else name
    for name in list_vt_configs()
]


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", OUTPUT_CASES)
def test_vt_outputs(name, target):
    target.activate()
    config = config_of(name)
    torch_model, ms_model = twins(config)
    x = images(config, BATCH, seed=1)
    torch_model.to(target.torch_device)
    with torch.no_grad():
        reference = named_outputs(config, torch_model, torch.from_numpy(x).to(target.torch_device))
    torch_model.to("cpu")
    ours = named_outputs(config, ms_model, ms.Tensor(x))
    blocks = computation_blocks(config)
    failures = []
    for (label, theirs), (_, mine) in zip(reference, ours):
        theirs = theirs.cpu().numpy()
        assert mine.shape == theirs.shape, f"{name} {label}: {mine.shape} in MindSpore vs {theirs.shape} in PyTorch"
        bound = target.logit_bound(blocks, theirs)
        assert np.abs(theirs).max() > 100 * bound, f"{name} {label} is near zero; the check would be vacuous"
        delta = harness.max_abs_delta(mine.asnumpy(), theirs)
        ok = delta <= bound
        record("VT outputs", name, target.name, label, f"{delta:.2e}", f"{bound:.1e}", ok)
        if not ok:
            failures.append(f"{label}: max |delta| {delta:.3e} > {bound:.2e}")
    if failures:
        where = first_divergence(torch_model, ms_model, x, target.logit_bound(blocks, reference[0][1].cpu().numpy()))
        pytest.fail(f"{name} on {target.name}: " + "; ".join(failures) + f"; first divergent submodule: {where}")


def _batchnorms(torch_model, ms_model):
    ms_norms = {name: cell for name, cell in ms_model.cells_and_names() if isinstance(cell, ms.nn.BatchNorm2d)}
    torch_norms = {n: m for n, m in torch_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert ms_norms.keys() == torch_norms.keys() and torch_norms
    return [(name, torch_norms[name], ms_norms[name]) for name in torch_norms]


@pytest.mark.parametrize("name", ["vt_resnet_fmnist", "resnet_fmnist"])
def test_batchnorm_statistics_convert_both_ways(name):
    """Running statistics land in moving_mean/moving_variance and come back unchanged; the
    momentum convention (MindSpore's 1 - PyTorch's) is checked by its effect, in the SGD step test."""
    torch_model, ms_model = twins(config_of(name))
    for key, t, m in _batchnorms(torch_model, ms_model):
        np.testing.assert_array_equal(m.moving_mean.asnumpy(), t.running_mean.numpy(), err_msg=key)
        np.testing.assert_array_equal(m.moving_variance.asnumpy(), t.running_var.numpy(), err_msg=key)
        assert m.eps == t.eps, key
    back = ms_to_canonical(ms_model)
    reference = torch_to_canonical(torch_model)
    assert back.keys() == reference.keys()
    assert all(np.array_equal(back[key], reference[key]) for key in reference)


@pytest.mark.parametrize("target", TARGET_PARAMS)
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_vt_one_sgd_step(name, target):
    """Training mode (batch statistics, running-statistics update) and one SGD step move both the same way."""
    target.activate()
    config = config_of(name)
    torch_model, ms_model = twins(config, seed=7)
    torch_model.train()
    ms_model.set_train(True)
    before = torch_to_canonical(torch_model)
    x = images(config, TRAIN_BATCH, seed=8)
    y = np.random.default_rng(9).integers(0, config.num_classes, TRAIN_BATCH)

    torch_model.to(target.torch_device)
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    torch_loss = torch.nn.functional.cross_entropy(
        torch_model(torch.from_numpy(x).to(target.torch_device)), torch.from_numpy(y).to(target.torch_device)
    )
    torch_loss.backward()
    optimizer.step()
    torch_model.to("cpu")

    ms_optimizer = ms.nn.SGD(ms_model.trainable_params(), learning_rate=LEARNING_RATE)
    grad_fn = ms.value_and_grad(lambda a, b: ms.ops.cross_entropy(ms_model(a), b), None, ms_optimizer.parameters)
    ms_loss, grads = grad_fn(ms.Tensor(x), ms.Tensor(y.astype(np.int32)))
    ms_optimizer(grads)

    loss_delta = abs(float(ms_loss.asnumpy()) - float(torch_loss.detach().cpu()))
    after_torch, after_ms = torch_to_canonical(torch_model), ms_to_canonical(ms_model)
    deltas = {key: harness.max_abs_delta(after_ms[key], after_torch[key]) for key in after_torch}
    worst = max(deltas, key=deltas.get)
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k not in statistics]
    step = max(harness.max_abs_delta(after_torch[k], before[k]) for k in weights)
    moved = max(harness.max_abs_delta(after_torch[k], before[k]) for k in statistics)
    blocks = computation_blocks(config)
    # the running statistics move by (1 - momentum) x batch statistics: bounded like the forward pass
    bound = max(target.step_bound(blocks, LEARNING_RATE, step), target.logit_bound(blocks, moved))
    loss_bound = target.logit_bound(blocks, float(torch_loss.detach().cpu()))
    ok = deltas[worst] <= bound and loss_delta <= loss_bound
    record(
        "VT train step", name, target.name, f"SGD lr {LEARNING_RATE}, largest update {step:.2e}",
        f"max |dw| {deltas[worst]:.2e} ({worst}), |dloss| {loss_delta:.1e}", f"{bound:.1e}, {loss_bound:.1e}", ok,
    )
    assert step > 100 * bound, f"the step barely moved the weights ({step:.2e}); the check would be vacuous"
    assert moved > 100 * bound, f"the running statistics barely moved ({moved:.2e})"
    assert ok, (
        f"after one step the tensors differ by up to {deltas[worst]:.3e} (bound {bound:.1e}) at {worst}; "
        f"the losses by {loss_delta:.3e}"
    )
