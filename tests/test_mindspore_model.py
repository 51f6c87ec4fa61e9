"""The MindSpore backend on its own: layout, modes, stage-wise API, input checks, training."""
import mindspore as ms
import numpy as np
import pytest
import torch

import dvt_mindspore
from dvt_mindspore import DVT, ReuseState, create_model, multi_exit_loss
from dvt_mindspore.convert import to_canonical
from dvt_shared import get_config, list_configs
from tests.release_fixtures import release_json

TINY = dict(depth=1, embed_dim=24, num_heads=2, token_dim=8, num_classes=5)


def tiny(**overrides) -> DVT:
    return DVT(get_config("dvt_t2t_vit_fmnist", **{**TINY, **overrides}))


def images(batch: int, seed: int = 0) -> ms.Tensor:
    return ms.Tensor(np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32))


def numpy_outputs(outputs) -> list[np.ndarray]:
    return [o.asnumpy() for o in outputs]


@pytest.mark.parametrize(
    "name,keys_file", [("dvt_t2t_vit_12", "t2t12_keys.json"), ("dvt_t2t_vit_14", "t2t14_keys.json"),
                       ("dvt_deit_small", "deit_s_keys.json")]
)
def test_parameters_map_to_release_keys(name, keys_file):
    expected = release_json(keys_file)
    got = {key: list(value.shape) for key, value in to_canonical(create_model(name)).items()}
    assert list(got) == list(expected)
    assert got == expected


def test_every_registered_name_builds():
    for name in list_configs():
        config = get_config(name, depth=1)
        model = dvt_mindspore.create_model(name, depth=1)
        assert isinstance(model, ms.nn.Cell) and model.config == config
        assert dvt_mindspore.create_model(name, depth=1, num_classes=7).config.num_classes == 7


def test_graph_mode_equals_pynative():
    model = tiny(depth=2)
    x = images(2)
    pynative = numpy_outputs(model(x))
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = numpy_outputs(model(x))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    jitted = numpy_outputs(ms.jit(model.construct)(x))
    for a, b, c in zip(pynative, graph, jitted):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-6)


def test_stagewise_api_equals_construct():
    model = tiny()
    x = images(3)
    full = numpy_outputs(model(x))
    state = None
    for index in range(model.num_exits):
        logits, state = model.forward_stage(index, x, state)
        np.testing.assert_array_equal(logits.asnumpy(), full[index])
    assert state == ReuseState(None, None)


def test_reuse_state_shapes():
    _, state = tiny().forward_stage(0, images(2))
    assert state.features.shape == (2, 10, 24)
    assert state.relations.shape == (2, 2 * 1, 10, 10)


def test_stage_needing_reuse_refuses_missing_state():
    model = tiny()
    with pytest.raises(ValueError, match="ReuseState"):
        model.forward_stage(1, images(1))
    with pytest.raises(IndexError, match="exits 0..2, got 3"):
        model.forward_stage(3, images(1))


@pytest.mark.parametrize("reuse", ["none", "feature", "relation", "both"])
def test_reuse_modes_match_torch(reuse):
    import dvt_torch
    from dvt_mindspore.convert import from_canonical
    from dvt_torch.convert import to_canonical as torch_canonical

    torch.manual_seed(0)
    reference = dvt_torch.DVT(get_config("dvt_t2t_vit_fmnist", reuse=reuse, **TINY)).eval()
    model = from_canonical(tiny(reuse=reuse), torch_canonical(reference))
    names = [name for name, _ in model.parameters_and_names()]
    assert any("feature_resuse_mlp" in n for n in names) == (reuse in ("feature", "both"))
    assert any("relation_reuse_conv" in n for n in names) == (reuse in ("relation", "both"))
    x = images(2)
    with torch.no_grad():
        expected = [o.numpy() for o in reference(torch.from_numpy(x.asnumpy()))]
    for ours, theirs in zip(numpy_outputs(model(x)), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_batch_one_any_class_count_and_image_size():
    model = create_model("dvt_t2t_vit_12", num_classes=3, img_size=96, depth=1)
    assert model.config.grids == (3, 4, 6)
    outputs = model(ms.Tensor(np.zeros((1, 3, 96, 96), np.float32)))
    assert [o.shape for o in outputs] == [(1, 3)] * 3


@pytest.mark.parametrize(
    "shape,dtype,match",
    [((2, 3, 28, 28), np.float32, r"\(B, 1, 28, 28\).*\(2, 3, 28, 28\)"),
     ((2, 1, 32, 32), np.float32, r"got \(2, 1, 32, 32\)"),
     ((1, 28, 28), np.float32, r"got \(1, 28, 28\)"),
     ((0, 1, 28, 28), np.float32, r"B >= 1"),
     ((2, 1, 28, 28), np.int32, "floating point")],
)
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_wrong_input_rejected(shape, dtype, match, mode):
    model = tiny()
    ms.set_context(mode=mode)
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            model(ms.Tensor(np.zeros(shape, dtype=dtype)))
        with pytest.raises((ValueError, TypeError), match=match):
            model.forward_stage(0, ms.Tensor(np.zeros(shape, dtype=dtype)))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_non_tensor_input_rejected():
    with pytest.raises(TypeError, match="mindspore.Tensor, got ndarray"):
        tiny()(np.zeros((1, 1, 28, 28), np.float32))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("dvt_t2t_vit_13")


def test_frozen_tensors_are_not_trainable():
    t2t = {name for name, _ in tiny().parameters_and_names()}
    trainable = {p.name for p in tiny().trainable_params()}
    frozen = t2t - trainable
    assert frozen and all(name.endswith(".w") or name.endswith(".pos_embed") for name in frozen)
    assert {n for n in frozen if n.endswith(".w")} == {n for n in t2t if n.endswith(".w")}
    deit = create_model("dvt_deit_small", depth=1, img_size=64, embed_dim=24, num_heads=2)
    assert "less_less_token.pos_embed" in {p.name for p in deit.trainable_params()}


def test_gradients_reach_every_trainable_parameter():
    model = tiny(depth=2)
    model.set_train(True)
    params = model.trainable_params()
    grad_fn = ms.value_and_grad(lambda x, y: multi_exit_loss(model(x), y), None, params)
    loss, grads = grad_fn(images(4), ms.Tensor(np.array([0, 1, 2, 3], np.int32)))
    assert np.isfinite(loss.asnumpy())
    missing = {p.name for p, g in zip(params, grads) if not np.abs(g.asnumpy()).any()}
    # As in the release (and the PyTorch backend), the last stage's last reuse MLP feeds only grid
    # tokens, which nothing reads after the last block: it alone gets no gradient.
    dead = {p.name for p in params if p.name.startswith("normal_token.blocks.1.feature_resuse_mlp.")}
    assert dead and missing == dead, sorted(missing ^ dead)


def test_training_mode_applies_dropout_and_drop_path():
    model = tiny(drop_rate=0.3, drop_path_rate=0.5)
    x = images(4)
    eval_a, eval_b = numpy_outputs(model(x)), numpy_outputs(model(x))
    np.testing.assert_array_equal(eval_a[2], eval_b[2])
    model.set_train(True)
    train_a, train_b = numpy_outputs(model(x)), numpy_outputs(model(x))
    assert np.abs(train_a[2] - train_b[2]).max() > 1e-4
    assert np.abs(train_a[2] - eval_a[2]).max() > 1e-4


def test_multi_exit_loss_is_sum_of_cross_entropies():
    rng = np.random.default_rng(0)
    outputs = tuple(ms.Tensor(rng.standard_normal((4, 5)).astype(np.float32)) for _ in range(3))
    y = ms.Tensor(np.array([0, 1, 2, 3], np.int32))
    expected = sum(float(ms.ops.cross_entropy(o, y).asnumpy()) for o in outputs)
    np.testing.assert_allclose(float(multi_exit_loss(outputs, y).asnumpy()), expected, rtol=1e-6)
    weighted = multi_exit_loss(outputs, y, weights=(0.0, 0.0, 2.0))
    np.testing.assert_allclose(float(weighted.asnumpy()), 2 * float(ms.ops.cross_entropy(outputs[2], y).asnumpy()), rtol=1e-6)
    with pytest.raises(ValueError, match="2 exit weights for 3 exits"):
        multi_exit_loss(outputs, y, weights=(1.0, 1.0))
