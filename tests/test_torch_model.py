import numpy as np
import pytest
import timm
import torch

import dvt_torch
from dvt_shared import get_config
from dvt_torch import DVT, ReuseState, create_model
from tests.release_fixtures import load_cascade, release_json

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")),
]


def tiny(**overrides):
    base = dict(embed_dim=24, depth=2, num_heads=2, token_dim=8, num_classes=5)
    base.update(overrides)
    return DVT(get_config("dvt_t2t_vit_fmnist", **base))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["t2t", "deit"])
def test_release_fixture_logits(family, device):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config, weights, io = load_cascade(f"{family}_mini")
    model = DVT(config).to(device).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        outputs = model(torch.from_numpy(io["images"]).to(device))
    assert len(outputs) == 3
    for index, logits in enumerate(outputs):
        delta = np.abs(logits.cpu().numpy() - io[f"exit{index}"]).max()
        print(f"{family}_mini exit {index} on {device}: max |dlogit| = {delta:.2e}")
        assert delta <= 1e-5, f"exit {index}: max |dlogit| {delta:.2e} > 1e-5"


@pytest.mark.parametrize("family", ["t2t", "deit"])
def test_every_reuse_path_matters_in_fixture(family):
    """Switching a reuse branch off must move the logits, or the fixture would not test it."""
    config, weights, io = load_cascade(f"{family}_mini")
    model = DVT(config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    x = torch.from_numpy(io["images"])
    with torch.no_grad():
        full = model(x)[2]
        model.less_token.relation_reuse_conv[2].weight.zero_()
        model.less_token.relation_reuse_conv[2].bias.zero_()
        model.normal_token.relation_reuse_conv[2].weight.zero_()
        model.normal_token.relation_reuse_conv[2].bias.zero_()
        assert (model(x)[2] - full).abs().max() > 1e-2


@pytest.mark.parametrize(
    "name,keys_file", [("dvt_t2t_vit_12", "t2t12_keys.json"), ("dvt_t2t_vit_14", "t2t14_keys.json"),
                       ("dvt_deit_small", "deit_s_keys.json")]
)
def test_state_dict_layout_equals_release(name, keys_file):
    expected = release_json(keys_file)
    model = create_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    # a release state dict loads strictly
    model.load_state_dict({k: torch.zeros(s) for k, s in expected.items()}, strict=True)


def test_stagewise_api_equals_forward():
    model = tiny().eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        full = model(x)
        state = None
        for index in range(model.num_exits):
            logits, state = model.forward_stage(index, x, state)
            torch.testing.assert_close(logits, full[index], rtol=0, atol=0)
    assert state == ReuseState(None, None)


def test_reuse_state_shapes():
    model = tiny().eval()
    with torch.no_grad():
        _, state = model.forward_stage(0, torch.randn(2, 1, 28, 28))
    assert state.features.shape == (2, 10, 24)
    assert state.relations.shape == (2, 2 * 2, 10, 10)


def test_stage_needing_reuse_refuses_missing_state():
    model = tiny().eval()
    with pytest.raises(ValueError, match="ReuseState"):
        model.forward_stage(1, torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize("reuse", ["none", "feature", "relation", "both"])
def test_reuse_modes(reuse):
    model = tiny(reuse=reuse)
    keys = model.state_dict().keys()
    assert any("feature_resuse_mlp" in k for k in keys) == (reuse in ("feature", "both"))
    assert any("relation_reuse_conv" in k for k in keys) == (reuse in ("relation", "both"))
    assert not any(k.startswith("less_less_token.") and ("reuse" in k or "resuse" in k) for k in keys)
    outputs = model.eval()(torch.randn(2, 1, 28, 28))
    assert [o.shape for o in outputs] == [(2, 5)] * 3


def test_batch_one_any_class_count_and_image_size():
    model = create_model("dvt_t2t_vit_12", num_classes=3, img_size=96, depth=1).eval()
    assert model.config.grids == (3, 4, 6)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 96))
    assert [o.shape for o in outputs] == [(1, 3)] * 3


@pytest.mark.parametrize(
    "shape,dtype,match",
    [((2, 3, 28, 28), torch.float32, r"\(B, 1, 28, 28\).*\(2, 3, 28, 28\)"),
     ((2, 1, 32, 32), torch.float32, r"got \(2, 1, 32, 32\)"),
     ((1, 28, 28), torch.float32, r"got \(1, 28, 28\)"),
     ((0, 1, 28, 28), torch.float32, r"B >= 1"),
     ((2, 1, 28, 28), torch.int64, "floating point")],
)
def test_wrong_input_rejected(shape, dtype, match):
    model = tiny().eval()
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.zeros(shape, dtype=dtype))


def test_channels_last_and_non_contiguous_inputs_work():
    model = tiny().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        cl = model(x.to(memory_format=torch.channels_last))
        nc = model(torch.randn(2, 1, 28, 56)[..., ::2].copy_(x))
    for a, b, c in zip(ref, cl, nc):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_timm_registry():
    model = timm.create_model("dvt_t2t_vit_fmnist", num_classes=4, depth=1)
    assert isinstance(model, DVT) and model.config.num_classes == 4 and model.config.depth == 1
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("dvt_t2t_vit_12", pretrained=True)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model name"):
        dvt_torch.create_model("dvt_t2t_vit_13")


def test_gradients_reach_every_trainable_parameter():
    model = tiny()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    dvt_torch.multi_exit_loss(model(x), y).backward()
    missing = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    # As in the release, the last block's reused features of the last stage reach only grid tokens,
    # which nothing reads after the last block: that one reuse MLP can get no gradient.
    dead = {n for n, _ in model.named_parameters() if n.startswith("normal_token.blocks.1.feature_resuse_mlp.")}
    assert dead and missing == dead, sorted(missing ^ dead)


def test_multi_exit_loss_is_sum_of_cross_entropies():
    outputs = (torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5))
    y = torch.tensor([0, 1, 2, 3])
    expected = sum(torch.nn.functional.cross_entropy(o, y) for o in outputs)
    torch.testing.assert_close(dvt_torch.multi_exit_loss(outputs, y), expected)
    weighted = dvt_torch.multi_exit_loss(outputs, y, weights=(0.0, 0.0, 2.0))
    torch.testing.assert_close(weighted, 2 * torch.nn.functional.cross_entropy(outputs[2], y))
    with pytest.raises(ValueError, match="2 exit weights for 3 exits"):
        dvt_torch.multi_exit_loss(outputs, y, weights=(1.0, 1.0))


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 1, 28, 28), 3, 1, 1), ((2, 3, 224, 224), 14, 8, 3), ((2, 3, 224, 224), 11, 6, 5), ((1, 16, 28, 28), 3, 2, 1),
    ((3, 2, 19, 19), 3, 2, 1), ((1, 1, 28, 28), 9, 1, 0)])
def test_soft_split_equals_unfold_bit_for_bit(shape, kernel, stride, padding):
    from dvt_torch.layers import soft_split

    x = torch.randn(shape, requires_grad=True)
    expected = torch.nn.Unfold(kernel, stride=stride, padding=padding)(x)
    got = soft_split(x, kernel, stride, padding)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got_grad, expected_grad)


def test_a_registered_config_keeps_its_class_count():
    assert create_model("dvt_t2t_vit_fmnist").config.num_classes == 10
    assert timm.create_model("dvt_t2t_vit_fmnist").config.num_classes == 10
    assert create_model("dvt_t2t_vit_12", depth=1).config.num_classes == 1000
    assert create_model("dvt_t2t_vit_fmnist", num_classes=3).config.num_classes == 3
