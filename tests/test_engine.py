"""Real early exit: the engine's decisions are the shared policy's, on every backend.

Each case is written once and runs on every backend (PyTorch eager, MindSpore graph mode)
against the shared NumPy policy applied to PyTorch's all-exit logits.
"""
import numpy as np
import pytest
import torch

from dvt_shared import find_thresholds, get_model_config
from dvt_shared.calibration import search
from dvt_shared.error_bounds import FP32, decision_agreement
from dvt_shared.exit_policy import ENTROPY, MAX_SOFTMAX, exit_indices, last_exit_only, softmax
from dvt_shared.flops import cumulative_flops
from dvt_torch import DVT
from dvt_torch.engine import AdaptiveDVT
from tests.bounds import assert_chosen_close, assert_exits_close


def sharp_tiny_model(seed=0):
    """A tiny fmnist DVT with weights large enough that confidences depend on the image."""
    torch.manual_seed(seed)
    model = DVT(get_model_config("dvt_t2t_vit_fmnist", embed_dim=24, depth=2, num_heads=2, token_dim=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.requires_grad:
                p.normal_(0, 1.5 / np.sqrt(p[0].numel()))
    return model


_twins: dict = {}


def engine(backend, model, thresholds, **kwargs):
    """`backend`'s engine over a twin of the PyTorch `model` (MindSpore: graph mode). One twin per model and
    backend in a process, so that MindSpore's engines over it share their compiled stages (tests/backends.py)."""
    key = (backend.name, id(model))
    if key not in _twins:
        _twins[key] = (model, backend.twin(model))  # the model is held, so that its id names it
    return backend.engine(_twins[key][1], thresholds, **kwargs)


@pytest.fixture(scope="module")
def case():
    model = sharp_tiny_model()
    images = torch.randn(300, 1, 28, 28)
    with torch.no_grad():
        all_exit = np.stack([o.numpy() for o in model.forward_exits(images)])
    probs = softmax(all_exit, axis=-1)
    thresholds = find_thresholds(probs, np.array([0.45, 0.3, 0.25], dtype=np.float32))
    return model, images, all_exit, probs, thresholds


def test_decisions_equal_shared_policy(case, backend):
    model, images, all_exit, probs, thresholds = case
    expected = exit_indices(probs, thresholds)
    assert set(np.unique(expected)) == {0, 1, 2}, "thresholds must use every exit"
    got = engine(backend, model, thresholds, max_batch=128).predict(backend.tensor(images.numpy()))
    conf = probs.max(-1)
    rows = np.arange(len(images))
    margins = MAX_SOFTMAX.margin(FP32.exit_bounds(model.config.depth, all_exit))
    agreement = decision_agreement(conf, got.exit_index, thresholds, margins)
    print(f"{backend.name}: exit counts {np.bincount(got.exit_index, minlength=3)}, borderline {agreement.borderline} "
          f"(margins {np.array2string(margins, precision=1)}), mismatched {int((got.exit_index != expected).sum())}")
    assert agreement.unexplained.size == 0, f"samples {agreement.unexplained[:10]} exit differently, none borderline"
    depth = model.config.depth
    assert_chosen_close(got.logits, all_exit[got.exit_index, rows], got.exit_index, depth)
    # a confidence moves by at most half its logits' bound (error_bounds)
    conf_delta = np.abs(got.confidence - conf[got.exit_index, rows])
    assert (conf_delta <= FP32.exit_bounds(depth, all_exit)[got.exit_index] / 2).all(), conf_delta.max()
    np.testing.assert_array_equal(got.macs, np.asarray(cumulative_flops(model.config))[got.exit_index])


def test_all_exit_logits_equal_the_models(case, backend):
    """`all_exit_logits` runs every stage on every image through the engine's own stages (MindSpore:
    its gears, here 300 images as 3 chunks of 100 padded to gear 128) and returns them in input order."""
    model, images, all_exit, _, thresholds = case
    got = engine(backend, model, thresholds, max_batch=128, gears="powers-of-two").all_exit_logits(
        backend.tensor(images.numpy())
    )
    assert got.shape == all_exit.shape and got.dtype == np.float32
    assert_exits_close(got, all_exit, model.config.depth)


def test_batch_of_one_streams_the_same(case, backend):
    model, images, _, _, thresholds = case
    streaming = engine(backend, model, thresholds, max_batch=128)
    batched = streaming.predict(backend.tensor(images[:40].numpy()))
    single = [streaming.predict(backend.tensor(images[i:i + 1].numpy())) for i in range(40)]
    np.testing.assert_array_equal(batched.exit_index, [p.exit_index[0] for p in single])
    assert_chosen_close(batched.logits, np.concatenate([p.logits for p in single]), batched.exit_index,
                        model.config.depth)


def test_work_really_stops():
    """Images leaving at exit 0 never reach later stages."""
    model = sharp_tiny_model()
    seen = []
    hook = model.normal_token.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    AdaptiveDVT(model, [-1e8, -1e8, -1e8]).predict(torch.randn(7, 1, 28, 28))
    assert seen == []
    AdaptiveDVT(model, [1e8, 1e8, -1e8]).predict(torch.randn(7, 1, 28, 28))
    assert seen == [7]
    hook.remove()


def test_set_thresholds_decides_as_a_new_engine_and_refuses_bad_ones(case):
    model, images, _, _, thresholds = case
    run = AdaptiveDVT(model, last_exit_only(model.config.num_exits))
    assert (run.predict(images).exit_index == 2).all()
    run.set_thresholds(thresholds)
    got = run.predict(images).exit_index
    assert set(np.unique(got)) == {0, 1, 2}
    np.testing.assert_array_equal(got, AdaptiveDVT(model, thresholds).predict(images).exit_index)
    with pytest.raises(ValueError, match="one per exit"):
        run.set_thresholds(thresholds[:2])
    with pytest.raises(ValueError, match="NaN"):
        run.set_thresholds([0.5, np.nan, 0.5])
    np.testing.assert_array_equal(run.thresholds, thresholds)


def test_nan_logits_are_reported_not_assigned(case, backend):
    """An image the model overflows on (finite, but far out of range) gets NaN logits: it is
    reported as undecided (-1), never assigned to an exit. Images holding NaN themselves are
    refused before the model runs (test_bad_input)."""
    model, images, *_ = case
    images = images[:4].clone()
    images[2] = images[2].sign() * 3e38  # finite, but the first norm's variance overflows
    got = engine(backend, model, [0.5, 0.5, -1e8], max_batch=128).predict(backend.tensor(images.numpy()))
    assert np.isnan(got.confidence[2]) and got.exit_index[2] == -1 and got.undecided == 1
    assert (got.exit_index[[0, 1, 3]] >= 0).all()


def test_onnx_export_leaves_the_model_in_eval_mode(tmp_path):
    from dvt_torch.export import export_onnx

    model = sharp_tiny_model()
    export_onnx(model, tmp_path)
    assert not any(m.training for m in model.modules())


def test_the_engine_decides_by_its_exit_policy_on_numpy_input(case, backend):
    """With the entropy policy (thresholds searched on its confidences), the engine's exits are the policy's
    on PyTorch's all-exit logits, up to borderline samples, and its NumPy input gives its tensor input's answer."""
    model, images, all_exit, probs, _ = case
    thresholds = search(ENTROPY, probs, None, cumulative_flops(model.config), p=1.2)
    expected = exit_indices(probs, thresholds, ENTROPY)
    assert set(np.unique(expected)) == {0, 1, 2}, "thresholds must use every exit"
    run = engine(backend, model, thresholds, max_batch=128, exit_policy=ENTROPY)
    got = run.predict(images.numpy())
    margins = ENTROPY.margin(FP32.exit_bounds(model.config.depth, all_exit))
    agreement = decision_agreement(ENTROPY.scores(probs), got.exit_index, thresholds, margins)
    assert agreement.unexplained.size == 0, f"samples {agreement.unexplained[:10]} exit differently, none borderline"
    rows = np.arange(len(images))
    conf_delta = np.abs(got.confidence - ENTROPY.scores(probs)[got.exit_index, rows])
    assert (conf_delta <= ENTROPY.lipschitz * FP32.exit_bounds(model.config.depth, all_exit)[got.exit_index]).all()
    from_tensor = run.predict(backend.tensor(images.numpy()))
    np.testing.assert_array_equal(got.exit_index, from_tensor.exit_index)
    np.testing.assert_array_equal(got.logits, from_tensor.logits)
