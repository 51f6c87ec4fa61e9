"""Exported stage graphs give the reference's logits and exit decisions: every export format of the
backend table (ONNX from PyTorch, run by ONNX Runtime; MindIR from the converted MindSpore model).

The graphs are exported per stage; each engine runs the shared early-exit loop over them. Per-exit logits are compared
with PyTorch's stage-wise outputs, decisions with the shared policy on PyTorch's confidences
(borderline samples within the CPU target's margin of a threshold are counted, not failed).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvt_cli.backends import BACKENDS, EXPORT_FORMATS, load
from dvt_shared.calibration import exit_shares, find_thresholds
from dvt_shared.error_bounds import decision_agreement
from dvt_shared.exit_policy import MAX_SOFTMAX, confidences, exit_indices, softmax
from parity_tests import harness
from parity_tests.report import record
from parity_tests.targets import CPU
from parity_tests.test_exit_decisions import structured_noise
from tests.backends import adapter
from tests.bounds import assert_chosen_close

CASES = [harness.Case("dvt_t2t_vit_fmnist"), harness.Case("deit_mini", fixture=True)]
SAMPLES = 256


def exported_engine(model, fmt: str, folder, thresholds):
    """The stage graphs of `model` in format `fmt`, exported by the backend that writes it (from its twin of
    the model, in graph mode where it has one), and the engine that runs them."""
    exporter = next(name for name, b in BACKENDS.items() if b.exports == fmt)
    side = adapter(exporter)
    side.activate(BACKENDS[exporter].devices["cpu"])
    side.mode("graph" if "graph" in side.modes else side.modes[0])
    load(exporter).export(side.twin(model), folder)
    runner = next((name for name, b in BACKENDS.items() if b.graphs_from == exporter), None)
    if runner is not None:
        return load(runner).AdaptiveDVT(folder, thresholds)
    return load(exporter).ExportedAdaptiveDVT(folder, thresholds)


def inputs(config, count: int, seed: int) -> np.ndarray:
    if config.in_chans == 1:
        return structured_noise(count, config.img_size, seed)
    return harness.images(config, count, seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_exported_stages_match_the_reference(case, fmt, tmp_path):
    model = harness.reference_model(case, seed=3, noise=0.1)
    config = model.config
    count = SAMPLES if config.img_size <= 64 else 8
    x = inputs(config, count, seed=21)
    with torch.no_grad():
        reference = np.stack([o.numpy() for o in model.forward_exits(torch.from_numpy(x))])
    thresholds = find_thresholds(softmax(reference), exit_shares(1.5, model.num_exits))
    engine = exported_engine(model, fmt, tmp_path / fmt, thresholds)
    images = x  # engines take NumPy batches

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
