"""Exported stage graphs give PyTorch's logits and exit decisions: ONNX Runtime and MindIR.

The graphs are exported per stage (ONNX from PyTorch, MindIR from the converted MindSpore
model); each engine runs the shared early-exit loop over them. Per-exit logits are compared
with PyTorch's stage-wise outputs, decisions with the shared policy on PyTorch's confidences
(borderline samples within the CPU target's margin of a threshold are counted, not failed).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch

from dvt_mindspore.export import MindIRAdaptiveDVT, export_mindir
from dvt_shared.error_bounds import decision_agreement
from dvt_shared.exit_policy import MAX_SOFTMAX, confidences, exit_indices, exit_shares, find_thresholds, softmax
from dvt_onnx import OnnxAdaptiveDVT
from dvt_torch.export import export_onnx
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import CPU
from parity_tests.test_exit_decisions import structured_noise
from tests.bounds import assert_chosen_close

CASES = [harness.Case("dvt_t2t_vit_fmnist"), harness.Case("deit_mini", fixture=True)]
SAMPLES = 256


def engines(case: harness.Case, tmp_path):
    model = harness.torch_model(case, seed=3, noise=0.1)
    export_onnx(model, tmp_path / "onnx")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        export_mindir(harness.mindspore_twin(model), tmp_path / "mindir")
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    return model


def inputs(config, count: int, seed: int) -> np.ndarray:
    if config.in_chans == 1:
        return structured_noise(count, config.img_size, seed)
    return harness.images(config, count, seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("fmt", ["onnx", "mindir"])
def test_exported_stages_match_pytorch(case, fmt, tmp_path):
    CPU.activate()
    model = engines(case, tmp_path)
    config = model.config
    count = SAMPLES if config.img_size <= 64 else 8
    x = inputs(config, count, seed=21)
    with torch.no_grad():
        reference = np.stack([o.numpy() for o in model.forward_exits(torch.from_numpy(x))])
    thresholds = find_thresholds(softmax(reference), exit_shares(1.5, model.num_exits))
    if fmt == "onnx":
        engine, images = OnnxAdaptiveDVT(tmp_path / "onnx", thresholds), x
    else:
        ms.set_context(mode=ms.GRAPH_MODE)
        engine, images = MindIRAdaptiveDVT(tmp_path / "mindir", thresholds), ms.Tensor(x)

    # every exit's logits for every image, through the engine's own stage graphs
    every_exit = engine.all_exit_logits(images)
    bounds = CPU.errors.exit_bounds(config.depth, reference)
    for k in range(model.num_exits):
        delta = harness.max_abs_delta(every_exit[k], reference[k])
        record(f"{fmt} logits", case.name, "cpu", f"exit {k}", f"{delta:.2e}", f"{bounds[k]:.1e}", delta <= bounds[k])
        assert delta <= bounds[k], (
            f"{fmt} exit {k}: max |dlogit| {delta:.2e} > {bounds[k]:.2e}, worst sample "
            f"{harness.worst_sample(every_exit[k], reference[k])}"
        )

    # real early exit: each image's logits are those of the exit it left at (compacted batches: other shapes)
    got = engine.predict(images)
    assert_chosen_close(got.logits, every_exit[got.exit_index, np.arange(count)], got.exit_index, config.depth)
    conf = confidences(softmax(reference))
    policy = exit_indices(conf, thresholds)
    agreement = decision_agreement(conf, got.exit_index, thresholds, MAX_SOFTMAX.margin(bounds))
    record(f"{fmt} decisions", case.name, "cpu", f"{count} samples, exits {np.bincount(policy).tolist()}",
           f"{agreement.differ} differ, {agreement.borderline} borderline (margin {agreement.margin:.1e})",
           "0 non-borderline", agreement.unexplained.size == 0)
    assert agreement.unexplained.size == 0, f"samples {agreement.unexplained[:10].tolist()} exit differently"
