"""The DVT cascade, every case once per backend (tests/backends.py): the release's logits and key
layout, the stage-wise API, the eval/train output contract, input checks, training.

References are NumPy (the release's stored logits, cross-entropy written out) wherever one
fits; PyTorch-only and MindSpore-only behaviour (CUDA, graph compilation) is at the end.
"""
import numpy as np
import pytest
import torch

from dvt_shared import get_model_config, list_model_names
from tests.bounds import assert_close, assert_exits_close
from tests.release_fixtures import load_cascade, release_json

TINY = dict(embed_dim=24, depth=2, num_heads=2, token_dim=8, num_classes=5)
RELATION_CONV_OUT = ("less_token.relation_reuse_conv.2", "normal_token.relation_reuse_conv.2")


def tiny_config(**overrides):
    return get_model_config("dvt_t2t_vit_fmnist", **{**TINY, **overrides})


def tiny(backend, **overrides):
    return backend.build(tiny_config(**overrides))


def images(backend, batch: int, seed: int = 0, size: int = 28, channels: int = 1):
    rng = np.random.default_rng(seed)
    return backend.tensor(rng.standard_normal((batch, channels, size, size)).astype(np.float32))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy in float64: the reference both backends' losses are held to."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def release_model(backend, family: str, weights_edit=None):
    config, weights, io = load_cascade(f"{family}_mini")
    if weights_edit:
        weights = weights_edit(dict(weights))
    return backend.convert.from_canonical(backend.build(config), weights), io


@pytest.mark.parametrize("family", ["t2t", "deit"])
def test_release_fixture_logits(backend, family):
    model, io = release_model(backend, family)
    outputs = backend.exits(model, backend.tensor(io["images"]))
    assert len(outputs) == 3
    assert_exits_close(outputs, [io[f"exit{k}"] for k in range(3)], model.config.depth, label=f"{family}_mini exit")


# The release's float64 answers hold every port to exactness: max |d| / max |logit| of a float64 run.
FLOAT64_RELATIVE_BOUND = 1e-12


@pytest.mark.parametrize("family", ["t2t", "deit"])
def test_release_fixture_logits_in_float64(backend, family):
    """Run in float64 with every constant in float64, the port is the release's function: its float64
    logits to 1e-12 relative on every exit, on any CPU (no kernel's rounding reaches that far)."""
    model, io = release_model(backend, family)
    model = backend.float64(model)
    outputs = backend.exits(model, backend.tensor(io["images"].astype(np.float64)))
    for index, logits in enumerate(outputs):
        reference = io[f"exit{index}_f64"]
        assert logits.dtype == np.float64
        relative = np.abs(logits - reference).max() / np.abs(reference).max()
        print(f"{family}_mini exit {index} on {backend.name}, float64: max |d| / max |logit| = {relative:.1e}")
        assert relative <= FLOAT64_RELATIVE_BOUND, f"exit {index}: {relative:.2e} > {FLOAT64_RELATIVE_BOUND:.0e}"


@pytest.mark.parametrize("family", ["t2t", "deit"])
def test_every_reuse_path_matters_in_fixture(backend, family):
    """Switching the relation reuse off must move the logits, or the fixture would not test it."""

    def without_relation_reuse(weights):
        for prefix in RELATION_CONV_OUT:
            for suffix in (".weight", ".bias"):
                weights[prefix + suffix] = np.zeros_like(weights[prefix + suffix])
        return weights

    full, io = release_model(backend, family)
    cut, _ = release_model(backend, family, without_relation_reuse)
    x = backend.tensor(io["images"])
    assert np.abs(backend.exits(cut, x)[2] - backend.exits(full, x)[2]).max() > 1e-2


@pytest.mark.parametrize(
    "name,keys_file", [("dvt_t2t_vit_12", "t2t12_keys.json"), ("dvt_t2t_vit_14", "t2t14_keys.json"),
                       ("dvt_deit_small", "deit_s_keys.json")]
)
def test_canonical_layout_equals_release(backend, name, keys_file):
    expected = release_json(keys_file)
    got = {key: list(value.shape) for key, value in backend.convert.to_canonical(backend.create_model(name)).items()}
    assert list(got) == list(expected)
    assert got == expected


def test_every_registered_name_builds_and_keeps_its_class_count(backend):
    for name in list_model_names(cascade=True):
        model = backend.create_model(name, depth=1)
        assert model.config == get_model_config(name, depth=1)
        assert backend.create_model(name, depth=1, num_classes=7).config.num_classes == 7
    assert backend.create_model("dvt_t2t_vit_fmnist").config.num_classes == 10
    assert backend.create_model("dvt_t2t_vit_12", depth=1).config.num_classes == 1000


def test_eval_returns_the_last_exit_and_training_every_exit(backend):
    model = tiny(backend, drop_rate=0.0)
    x = images(backend, 3)
    exits = backend.exits(model, x)
    assert len(exits) == 3 and not np.array_equal(exits[0], exits[2])
    np.testing.assert_array_equal(backend.numpy(backend.call(model, x)), exits[2])
    backend.set_train(model, True)
    training = backend.call(model, x)
    assert isinstance(training, tuple) and len(training) == 3
    # the same values, up to summation order: MindSpore's training-mode kernels may add up in another
    assert_exits_close([backend.numpy(o) for o in training], exits, model.config.depth)


def test_stagewise_api_equals_forward_exits(backend):
    model = tiny(backend)
    x = images(backend, 3)
    full = backend.exits(model, x)
    state = None
    for index in range(model.num_exits):
        logits, state = model.forward_stage(index, x, state)
        np.testing.assert_array_equal(backend.numpy(logits), full[index])
    assert state == backend.package.ReuseState(None, None)


def test_reuse_state_shapes(backend):
    _, state = tiny(backend).forward_stage(0, images(backend, 2))
    assert state.features.shape == (2, 10, 24)
    assert state.relations.shape == (2, 2 * 2, 10, 10)


def test_stage_needing_reuse_refuses_missing_state(backend):
    model = tiny(backend)
    with pytest.raises(ValueError, match="ReuseState"):
        model.forward_stage(1, images(backend, 1))
    with pytest.raises(IndexError, match="exits 0..2, got 3"):
        model.forward_stage(3, images(backend, 1))


@pytest.mark.parametrize("reuse", ["none", "feature", "relation", "both"])
def test_reuse_modes(backend, reuse):
    model = tiny(backend, reuse=reuse)
    keys = backend.convert.to_canonical(model).keys()
    assert any("feature_resuse_mlp" in k for k in keys) == (reuse in ("feature", "both"))
    assert any("relation_reuse_conv" in k for k in keys) == (reuse in ("relation", "both"))
    assert not any(k.startswith("less_less_token.") and ("reuse" in k or "resuse" in k) for k in keys)
    assert [o.shape for o in backend.exits(model, images(backend, 2))] == [(2, 5)] * 3


def test_batch_one_any_class_count_and_image_size(backend):
    model = backend.create_model("dvt_t2t_vit_12", num_classes=3, img_size=96, depth=1)
    assert model.config.grids == (3, 4, 6)
    outputs = backend.exits(model, images(backend, 1, size=96, channels=3))
    assert [o.shape for o in outputs] == [(1, 3)] * 3


@pytest.mark.parametrize(
    "shape,dtype,match",
    [((2, 3, 28, 28), np.float32, r"\(B, 1, 28, 28\).*\(2, 3, 28, 28\)"),
     ((2, 1, 32, 32), np.float32, r"got \(2, 1, 32, 32\)"),
     ((1, 28, 28), np.float32, r"got \(1, 28, 28\)"),
     ((0, 1, 28, 28), np.float32, r"B >= 1"),
     ((2, 1, 28, 28), np.int32, "floating point")],
)
def test_wrong_input_rejected(backend, shape, dtype, match):
    model = tiny(backend)
    bad = backend.tensor(np.zeros(shape, dtype=dtype))
    for mode in backend.modes:
        backend.mode(mode)
        for entry in (lambda: backend.call(model, bad), lambda: model.forward_exits(bad),
                      lambda: model.forward_stage(0, bad)):
            with pytest.raises((ValueError, TypeError), match=match):
                entry()


def test_non_tensor_input_rejected(backend):
    with pytest.raises(TypeError, match=r"Tensor, got ndarray"):
        backend.call(tiny(backend), np.zeros((1, 1, 28, 28), np.float32))


def test_unknown_name(backend):
    with pytest.raises(ValueError, match="unknown model name"):
        backend.create_model("dvt_t2t_vit_13")


def test_frozen_tensors_are_not_trainable(backend):
    model = tiny(backend)
    frozen = set(backend.convert.to_canonical(model)) - backend.trainable_names(model)
    # The performer's random features and the sinusoid positions are fixed, as in the release.
    assert frozen and all(name.endswith(".w") or name.endswith(".pos_embed") for name in frozen)
    performer_features = {n for n in backend.convert.to_canonical(model) if n.endswith(".w")}
    assert {n for n in frozen if n.endswith(".w")} == performer_features
    deit = backend.create_model("dvt_deit_small", depth=1, img_size=64, embed_dim=24, num_heads=2)
    assert "less_less_token.pos_embed" in backend.trainable_names(deit)


def test_gradients_reach_every_trainable_parameter(backend):
    model = backend.set_train(tiny(backend), True)
    grads = backend.gradients(model, images(backend, 4), np.array([0, 1, 2, 3]))
    missing = {name for name, grad in grads.items() if not np.abs(grad).any()}
    # As in the release, the last block's reused features of the last stage reach only grid tokens,
    # which nothing reads after the last block: that one reuse MLP can get no gradient.
    dead = {name for name in grads if name.startswith("normal_token.blocks.1.feature_resuse_mlp.")}
    assert dead and missing == dead, sorted(missing ^ dead)


def test_training_mode_applies_dropout_and_drop_path(backend):
    model = tiny(backend, drop_rate=0.3, drop_path_rate=0.5)
    x = images(backend, 4)
    eval_a, eval_b = backend.exits(model, x), backend.exits(model, x)
    np.testing.assert_array_equal(eval_a[2], eval_b[2])
    backend.set_train(model, True)
    train_a, train_b = backend.exits(model, x), backend.exits(model, x)
    assert np.abs(train_a[2] - train_b[2]).max() > 1e-4
    assert np.abs(train_a[2] - eval_a[2]).max() > 1e-4


def test_multi_exit_loss_is_the_sum_of_cross_entropies(backend):
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(3)]
    labels = np.array([0, 1, 2, 3])
    outputs = tuple(backend.tensor(o) for o in logits)
    expected = sum(cross_entropy(o, labels) for o in logits)
    assert backend.multi_exit_loss(outputs, labels) == pytest.approx(expected, rel=1e-6)
    weighted = backend.multi_exit_loss(outputs, labels, weights=(0.0, 0.0, 2.0))
    assert weighted == pytest.approx(2 * cross_entropy(logits[2], labels), rel=1e-6)
    with pytest.raises(ValueError, match="2 exit weights for 3 exits"):
        backend.multi_exit_loss(outputs, labels, weights=(1.0, 1.0))


# PyTorch alone: the release fixtures on CUDA, and the strided-view soft split.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("family", ["t2t", "deit"])
def test_release_fixture_logits_on_cuda(family):
    import dvt_torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config, weights, io = load_cascade(f"{family}_mini")
    model = dvt_torch.DVT(config).to("cuda").eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        outputs = model.forward_exits(torch.from_numpy(io["images"]).to("cuda"))
    assert_exits_close([o.cpu().numpy() for o in outputs], [io[f"exit{k}"] for k in range(3)], config.depth)


# MindSpore alone: graph compilation of the whole cascade and of its stages.
@pytest.mark.slow
def test_mindspore_graph_mode_equals_pynative():
    import mindspore as ms

    from tests.backends import MindSporeBackend

    backend = MindSporeBackend()
    model = tiny(backend)
    x = images(backend, 2)
    pynative_exits, pynative = backend.exits(model, x), backend.numpy(model(x))
    backend.mode("graph")
    graph_exits, graph = backend.exits(model, x), backend.numpy(model(x))
    backend.mode("pynative")
    jitted = backend.numpy(ms.jit(model.construct)(x))
    depth = model.config.depth
    assert_exits_close(graph_exits, pynative_exits, depth)
    assert_close(graph, pynative, 3 * depth, label="graph mode")
    assert_close(jitted, pynative, 3 * depth, label="ms.jit")
    np.testing.assert_array_equal(pynative, pynative_exits[2])


@pytest.mark.parametrize("reuse", ["none", "feature", "relation", "both"])
def test_mindspore_matches_pytorch_in_every_reuse_mode(reuse):
    import dvt_torch
    from tests.backends import MindSporeBackend

    torch.manual_seed(0)
    reference = dvt_torch.DVT(tiny_config(reuse=reuse)).eval()
    backend = MindSporeBackend()
    x = np.random.default_rng(2).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = [o.numpy() for o in reference.forward_exits(torch.from_numpy(x))]
    assert_exits_close(backend.exits(backend.twin(reference), backend.tensor(x)), expected, reference.config.depth)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 1, 28, 28), 3, 1, 1), ((2, 3, 224, 224), 14, 8, 3), ((2, 3, 224, 224), 11, 6, 5), ((1, 16, 28, 28), 3, 2, 1),
    ((3, 2, 19, 19), 3, 2, 1), ((1, 1, 28, 28), 9, 1, 0)])
def test_torch_soft_split_equals_unfold_bit_for_bit(shape, kernel, stride, padding):
    from dvt_torch.layers import soft_split_tokens

    x = torch.randn(shape, requires_grad=True)
    expected = torch.nn.Unfold(kernel, stride=stride, padding=padding)(x)
    # the stem's token-major (B, H, W, C) -> (B, L, C*k*k), in nn.Unfold's (B, C*k*k, L) layout
    got = soft_split_tokens(x.permute(0, 2, 3, 1), kernel, stride, padding).transpose(1, 2)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got_grad, expected_grad)
