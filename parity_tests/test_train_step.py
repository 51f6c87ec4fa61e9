"""One SGD step on the same data moves the weights of both backends the same way."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch

import dvt_mindspore
import dvt_torch
from dvt_mindspore.convert import to_canonical as ms_to_canonical
from dvt_torch.convert import to_canonical as torch_to_canonical
from dvt_shared.error_bounds import computation_blocks
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import TARGET_PARAMS

CASE = harness.Case("dvt_t2t_vit_fmnist")
NO_DROPOUT = dict(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, stem_drop_rate=0.0)
LEARNING_RATE = 0.1
BATCH = 8


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_one_sgd_step(target):
    target.activate()
    torch_model = harness.torch_model(CASE, seed=7, **NO_DROPOUT).train()
    ms_model = harness.mindspore_twin(torch_model)
    assert ms_model.training
    before = torch_to_canonical(torch_model)
    config = torch_model.config
    x = harness.images(config, BATCH, seed=8)
    y = np.random.default_rng(9).integers(0, config.num_classes, BATCH)

    torch_model.to(target.torch_device)
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    torch_loss = dvt_torch.multi_exit_loss(
        torch_model(torch.from_numpy(x).to(target.torch_device)), torch.from_numpy(y).to(target.torch_device)
    )
    torch_loss.backward()
    optimizer.step()
    torch_model.to("cpu")

    ms_optimizer = ms.nn.SGD(ms_model.trainable_params(), learning_rate=LEARNING_RATE)

    def loss_fn(images, labels):
        return dvt_mindspore.multi_exit_loss(ms_model(images), labels)

    grad_fn = ms.value_and_grad(loss_fn, None, ms_optimizer.parameters)
    ms_loss, grads = grad_fn(ms.Tensor(x), ms.Tensor(y.astype(np.int32)))
    ms_optimizer(grads)

    loss_delta = abs(float(ms_loss.asnumpy()) - float(torch_loss.detach().cpu()))
    after_torch, after_ms = torch_to_canonical(torch_model), ms_to_canonical(ms_model)
    step = max(harness.max_abs_delta(after_torch[k], before[k]) for k in before)
    deltas = {key: harness.max_abs_delta(after_ms[key], after_torch[key]) for key in after_torch}
    worst = max(deltas, key=deltas.get)
    blocks = computation_blocks(config)
    bound = target.step_bound(blocks, LEARNING_RATE, step)
    loss_bound = target.logit_bound(blocks, float(torch_loss.detach().cpu()))
    ok = deltas[worst] <= bound and loss_delta <= loss_bound
    record(
        "train step", CASE.name, target.name, f"SGD lr {LEARNING_RATE}, largest update {step:.2e}",
        f"max |dw| {deltas[worst]:.2e} ({worst}), |dloss| {loss_delta:.1e}", f"{bound:.1e}, {loss_bound:.1e}", ok,
    )
    assert step > 100 * bound, f"the step barely moved the weights ({step:.2e}); the check would be vacuous"
    if not ok:
        fresh = harness.torch_model(CASE, seed=7, **NO_DROPOUT)
        where = harness.first_divergence(fresh, harness.mindspore_twin(fresh), x, loss_bound, target.torch_device)
        pytest.fail(
            f"after one step the weights differ by up to {deltas[worst]:.3e} (bound {bound:.1e}) at "
            f"{worst}; the losses by {loss_delta:.3e}; first divergent layer of the forward pass: {where}"
        )
