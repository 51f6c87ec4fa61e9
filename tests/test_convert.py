"""Canonical tensors <-> PyTorch and MindSpore models, and MindSpore `.ckpt` files."""
import os

import mindspore as ms
import numpy as np
import pytest
import torch

import dvt_mindspore
import dvt_torch
from dvt_mindspore import checkpoint as ms_checkpoint
from dvt_mindspore import convert as ms_convert
from dvt_shared import get_model_config
from dvt_torch import convert as torch_convert
from tests.release_fixtures import load_cascade

CONFIG = get_model_config("dvt_t2t_vit_fmnist", depth=1, embed_dim=24, num_heads=2, token_dim=8, num_classes=5)


def torch_model(seed: int = 0) -> dvt_torch.DVT:
    torch.manual_seed(seed)
    model = dvt_torch.DVT(CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.02)
    return model


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == np.float32, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_torch_canonical_is_the_state_dict():
    model = torch_model()
    tensors = torch_convert.to_canonical(model)
    assert list(tensors) == list(model.state_dict())
    assert "less_less_token.tokens_to_token.attention1.w" in tensors and "less_less_token.pos_embed" in tensors
    assert not any("resample" in key for key in tensors)


def test_torch_to_mindspore_to_torch_is_bit_exact():
    source = torch_model()
    canonical = torch_convert.to_canonical(source)
    twin = ms_convert.from_canonical(dvt_mindspore.DVT(CONFIG), canonical)
    back = ms_convert.to_canonical(twin)
    assert sorted(back) == sorted(canonical)
    target = torch_convert.from_canonical(torch_model(seed=1), back)
    for (key, a), (other, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert key == other and torch.equal(a, b), key


def test_fixture_weights_load_into_both_backends():
    config, weights, _ = load_cascade("deit_mini")
    torch_convert.from_canonical(dvt_torch.DVT(config), weights)
    model = ms_convert.from_canonical(dvt_mindspore.DVT(config), weights)
    back = ms_convert.to_canonical(model)
    assert sorted(back) == sorted(weights)
    assert all(np.array_equal(back[key], weights[key]) for key in weights)


def test_mindspore_names_follow_the_model():
    model = dvt_mindspore.DVT(CONFIG)
    names = ms_convert.mindspore_names(ms_convert.to_canonical(model))
    assert sorted(names.values()) == sorted(name for name, _ in model.parameters_and_names())
    assert names["less_less_token.norm.weight"] == "less_less_token.norm.gamma"
    assert names["less_token.blocks.0.feature_resuse_mlp.0.bias"] == "less_token.blocks.0.feature_resuse_mlp.0.beta"
    assert names["less_less_token.head.bias"] == "less_less_token.head.bias"
    assert ms_convert.release_key("less_less_token.norm.beta") == "less_less_token.norm.bias"


def broken(tensors: dict) -> dict:
    """Two tensors missing, two unexpected, two mis-shaped."""
    tensors = dict(tensors)
    del tensors["less_less_token.cls_token"], tensors["normal_token.head.bias"]
    tensors["less_less_token.extra"] = np.zeros(3, np.float32)
    tensors["module.head.weight"] = np.zeros((2, 2), np.float32)
    tensors["less_token.norm.weight"] = np.zeros(7, np.float32)
    tensors["less_token.head.weight"] = np.zeros((5, 25), np.float32)
    return tensors


def test_load_errors_name_every_bad_tensor_and_load_nothing(backend):
    canonical = torch_convert.to_canonical(torch_model())
    model, convert = backend.build(CONFIG), backend.convert
    before = convert.to_canonical(model)
    with pytest.raises(ValueError) as info:
        convert.from_canonical(model, broken(canonical), source="broken.safetensors")
    message = str(info.value)
    assert "2 missing, 2 unexpected, 2 mis-shaped" in message
    for name in ("less_less_token.cls_token", "normal_token.head.bias", "less_less_token.extra", "module.head.weight"):
        assert name in message
    assert "less_token.norm.weight: expected (24,) vs got (7,)" in message
    assert "less_token.head.weight: expected (5, 24) vs got (5, 25)" in message
    assert "broken.safetensors" in message
    assert_same_tensors(convert.to_canonical(model), before)


def test_ckpt_round_trip_is_bit_exact(tmp_path):
    model = ms_convert.from_canonical(dvt_mindspore.DVT(CONFIG), torch_convert.to_canonical(torch_model()))
    canonical = ms_convert.to_canonical(model)
    from_model, from_tensors = tmp_path / "model.ckpt", tmp_path / "tensors.ckpt"
    ms_checkpoint.save_ckpt(model, from_model)
    ms_checkpoint.save_ckpt(canonical, from_tensors)
    assert_same_tensors(ms_checkpoint.load_ckpt(from_model), canonical)
    assert_same_tensors(ms_checkpoint.load_ckpt(from_tensors), canonical)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt", "tensors.ckpt"]


def test_ckpt_loads_with_mindspore_alone(tmp_path):
    model = ms_convert.from_canonical(dvt_mindspore.DVT(CONFIG), torch_convert.to_canonical(torch_model()))
    path = tmp_path / "weights.ckpt"
    ms_checkpoint.save_ckpt(model, path)
    fresh = dvt_mindspore.DVT(CONFIG)
    not_loaded, unused = ms.load_param_into_net(fresh, ms.load_checkpoint(str(path)))
    assert not_loaded == [] and unused == []
    assert_same_tensors(ms_convert.to_canonical(fresh), ms_convert.to_canonical(model))


def test_ckpt_is_replaced_atomically(tmp_path):
    path = tmp_path / "weights.ckpt"
    first = ms_convert.to_canonical(dvt_mindspore.DVT(CONFIG))
    ms_checkpoint.save_ckpt(first, path)
    second = {key: value + 1 for key, value in first.items()}
    ms_checkpoint.save_ckpt(second, path)
    assert_same_tensors(ms_checkpoint.load_ckpt(path), second)
    assert os.listdir(tmp_path) == ["weights.ckpt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ms_checkpoint.save_ckpt(first, tmp_path / "missing" / "weights.ckpt")
    assert os.listdir(tmp_path) == ["weights.ckpt"]


def test_load_ckpt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ms_checkpoint.load_ckpt(tmp_path / "absent.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable MindSpore checkpoint"):
        ms_checkpoint.load_ckpt(garbage)
