"""timm's model contract, as timm's own model tests check it, on every model registered in timm.

Written for this project, after the checks of huggingface/pytorch-image-models
tests/test_models.py: pretrained_cfg/default_cfg, num_classes/num_features/head_hidden_size,
one tensor from `model(x)` in eval mode, forward_features -> forward_head, get_classifier and
reset_classifier (also through `create_model(num_classes=0)`; new heads on the model's device,
dtype and training mode), backward through every parameter, pool_size, device/dtype/global_pool
at creation, features_only (FeatureListNet and the feature-getter path, forward_intermediates and
prune_intermediate_layers), torch.fx tracing, and the transform `timm.data` derives from the model.
Models are built small (config overrides) so that all of them run in seconds.
"""
import copy
from functools import partial

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import FeatureListNet, get_notrace_functions
from timm.models._features import FeatureGetterNet

import dvt_torch  # noqa: F401  (registers every DVT and VT name with timm)
from dvt_shared.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, normalise_fashion_mnist
from dvt_shared.models import list_model_names

SMALL_DVT = dict(depth=1, embed_dim=24, num_heads=2, token_dim=8)
SMALL_TRUNK = {"trunk": {"layers": [1, 1, 1, 1], "channels": [4, 4, 8, 8], "stem_width": 8}}
# Small versions of every registered model: the same family, stems and heads, fewer and narrower layers.
SMALL = {
    **{name: dict(SMALL_DVT) for name in list_model_names(cascade=True)},
    "dvt_t2t_vit_12": dict(SMALL_DVT, img_size=64), "dvt_t2t_vit_14": dict(SMALL_DVT, img_size=64),
    "dvt_deit_small": dict(SMALL_DVT, img_size=64),
    "vt_resnet18": dict(SMALL_TRUNK, vt={"tokens": 4, "token_dim": 16}, img_size=64),
    "vt_resnet34": dict(SMALL_TRUNK, vt={"tokens": 4, "token_dim": 16}, img_size=64),
    "vt_resnet_fmnist": dict(SMALL_TRUNK, vt={"tokens": 4, "token_dim": 16}),
    "resnet_fmnist": dict(SMALL_TRUNK),
    "vt_fpn_r50": dict(SMALL_TRUNK, vt={"tokens": 2, "token_dim": 16}, fpn_channels=8, img_size=(40, 56)),
}
ALL_NAMES = sorted(list_model_names(cascade=True) + list_model_names(cascade=False))
DVT_NAMES = list_model_names(cascade=True)
CLASSIFIERS = [name for name in ALL_NAMES if name != "vt_fpn_r50"]  # VT-FPN predicts per pixel
TRUNK_MODELS = list_model_names(cascade=False)


def create(name: str, **kwargs):
    """The small version of `name`; `kwargs` may override its config (e.g. depth)."""
    return timm.create_model(name, pretrained=False, **{**SMALL[name], **kwargs})


def inputs(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *model.pretrained_cfg["input_size"]), generator=generator)


def test_every_registered_name_is_a_timm_model():
    assert sorted(SMALL) == ALL_NAMES
    assert set(ALL_NAMES) <= set(timm.list_models())
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("dvt_t2t_vit_12", pretrained=True)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_pretrained_cfg_names_real_layers_and_the_config(name):
    model = create(name).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    size = model.config.img_size if isinstance(model.config.img_size, tuple) else (model.config.img_size,) * 2
    assert cfg["input_size"] == (model.config.in_chans, *size)
    assert cfg["num_classes"] == model.num_classes == model.config.num_classes
    assert len(cfg["mean"]) == len(cfg["std"]) == model.config.in_chans
    assert cfg["interpolation"] in ("bilinear", "bicubic") and 0 < cfg["crop_pct"] <= 1
    state = model.state_dict()
    for key in ("classifier", "first_conv"):
        names = cfg[key] if isinstance(cfg[key], tuple) else (cfg[key],)
        assert names and all(f"{n}.weight" in state for n in names), (key, names)
    assert model.num_features > 0 and model.head_hidden_size > 0


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_eval_forward_is_one_tensor_of_forward_features_then_head(name):
    model = create(name).eval()
    x = inputs(model)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    assert isinstance(out, torch.Tensor) and out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(logits, out, rtol=0, atol=0)
    channel_axis = -1 if getattr(model, "output_fmt", "NCHW") == "NLC" else 1
    assert features.shape[channel_axis] == model.num_features
    assert pooled.shape == (2, model.head_hidden_size)
    exits = model.forward_exits(x)
    assert isinstance(exits, tuple) and len(exits) == model.config.num_exits
    torch.testing.assert_close(exits[-1], out, rtol=0, atol=0)


def test_vt_fpn_forward_is_one_per_pixel_tensor_of_its_levels():
    model = create("vt_fpn_r50").eval()
    x = inputs(model)
    with torch.no_grad():
        out = model(x)
        levels = model.forward_features(x)
        merged = model.forward_head(levels, pre_logits=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, model.num_classes, 40 // 4, 56 // 4)
    assert [level.shape[1] for level in levels] == [model.num_features] * 4
    torch.testing.assert_close(model.forward_head(levels), out, rtol=0, atol=0)
    assert merged.shape == (2, model.head_hidden_size, 10, 14)
    assert model.forward_exits(x)[0].shape == out.shape


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_reset_classifier(name):
    model = create(name).eval()
    x = inputs(model)
    model.reset_classifier(7)
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    assert model.num_classes == 7 and all(head.out_features == 7 for head in heads)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    headless = create(name, num_classes=0).eval()
    assert headless.num_classes == 0
    with torch.no_grad():
        assert headless(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_reset_classifier_follows_the_model_device_dtype_and_mode(name):
    """timm's check: the new head (and a trunk's new pool) on the model's device and dtype, in its training mode."""
    model = create(name, device="meta", dtype=torch.float64).eval()
    model.reset_classifier(2, "" if name in TRUNK_MODELS else None)
    heads = model.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    parameters = [p for head in heads for p in head.parameters()]
    assert parameters and all(p.device.type == "meta" and p.dtype == torch.float64 for p in parameters)
    assert not [module_name for module_name, module in model.named_modules() if module.training]


@pytest.mark.parametrize("name", TRUNK_MODELS)
def test_reset_classifier_without_pooling_keeps_the_spatial_output(name):
    model = create(name).eval()
    x = inputs(model)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, "")
        out = model(x)
    if name == "vt_fpn_r50":  # the merged FPN map: the finest level's size
        assert out.shape == (2, model.num_features, *features[0].shape[-2:])
    else:
        torch.testing.assert_close(out, features, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dvt_t2t_vit_fmnist", "dvt_deit_small"])
def test_dvt_refuses_a_global_pool_it_does_not_have(name):
    with pytest.raises(ValueError, match="class token"):
        create(name).reset_classifier(0, "avg")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_backward_reaches_every_parameter(name):
    model = create(name, num_classes=42).train()
    outputs = model(inputs(model))
    if isinstance(outputs, tuple):  # DVT in training mode: every exit, as timm's distilled models
        assert len(outputs) == model.config.num_exits
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    assert outputs.shape[1] == 42
    # timm's check: a gradient reaches every parameter (the release's one dead branch, the last
    # stage's last feature-reuse MLP, gets a zero gradient: see test_dvt_model).
    missing = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert not missing, missing


@pytest.mark.parametrize(
    "overrides, expected",
    [({}, (4, 4)), ({"img_size": 30}, (4, 4)), ({"img_size": 64}, (8, 8)),
     # the ImageNet stem (7x7/2 convolution, 3x3/2 pool): stride 32, sides rounded up at every step
     ({"img_size": 64, "trunk": {"stem": "imagenet"}}, (2, 2)),
     ({"img_size": 72, "trunk": {"stem": "imagenet"}}, (3, 3))],
)
def test_resnet_pool_size_is_its_feature_map_size(overrides, expected):
    """timm's pool_size: what forward_features and the unpooled, headless model return, at the config's size."""
    small = {**SMALL["resnet_fmnist"], "trunk": {**SMALL_TRUNK["trunk"], **overrides.pop("trunk", {})}, **overrides}
    model = timm.create_model("resnet_fmnist", **small).eval()
    assert model.pretrained_cfg["pool_size"] == expected
    x = inputs(model, batch=1)
    with torch.no_grad():
        assert tuple(model.forward_features(x).shape[-2:]) == expected
        model.reset_classifier(0, "")
        assert tuple(model(x).shape[-2:]) == expected
        unpooled = timm.create_model("resnet_fmnist", num_classes=0, global_pool="", **small).eval()
        assert tuple(unpooled(x).shape[-2:]) == expected


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "resnet_fmnist"])
def test_token_and_multi_level_models_have_no_pool_size(name):
    """DVT and VT-ResNet return tokens, VT-FPN four maps: no one map to pool, as timm's ViTs (None)."""
    assert create(name).pretrained_cfg["pool_size"] is None


@pytest.mark.parametrize("name", ALL_NAMES)
def test_device_and_dtype_at_creation(name):
    """timm's create_model(device=, dtype=): every parameter and buffer there, floating ones in dtype."""
    model = create(name, device="meta", dtype=torch.float64)
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert tensors and all(t.device.type == "meta" for t in tensors.values())
    assert all(t.dtype == torch.float64 for t in tensors.values() if t.is_floating_point())
    assert model.in_chans == model.pretrained_cfg["input_size"][0]
    # in eval mode a DVT scans its input for NaN and Inf, which a meta tensor does not hold
    x = torch.empty((2, *model.pretrained_cfg["input_size"]), device="meta", dtype=torch.float64)
    assert model.eval()(x).device.type == "meta"


@pytest.mark.parametrize("name", TRUNK_MODELS)
def test_features_only(name):
    model = create(name, features_only=True).eval()
    assert isinstance(model, FeatureListNet)
    x = inputs(model, batch=1)
    with torch.no_grad():
        features = model(x)
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(features) == len(channels) >= 4
    height = x.shape[-2]
    for feature, channel, reduction in zip(features, channels, reductions):
        assert feature.shape[1] == channel
        assert feature.shape[-2] == -(-height // reduction), (feature.shape, reduction)
    # timm's build_model_with_cfg: a feature backbone's cfg, without classifier or class count, under both names
    assert model.default_cfg is model.pretrained_cfg
    assert model.pretrained_cfg["input_size"] == tuple(x.shape[1:])
    assert not {"classifier", "num_classes"} & set(model.pretrained_cfg)
    assert model.in_chans == x.shape[1]


@pytest.mark.parametrize("name", TRUNK_MODELS)
def test_forward_intermediates_and_the_feature_getter(name):
    """timm's feature-getter path: forward_intermediates gives the maps FeatureListNet taps, and forward_features."""
    torch.manual_seed(5)
    model = create(name).eval()
    torch.manual_seed(5)
    listed = create(name, features_only=True).eval()
    torch.manual_seed(5)
    getter = create(name, features_only=True, feature_cls="getter").eval()
    assert isinstance(getter, FeatureGetterNet)
    assert getter.feature_info.channels() == listed.feature_info.channels()
    assert getter.feature_info.reduction() == listed.feature_info.reduction()
    assert getter.default_cfg is getter.pretrained_cfg and "classifier" not in getter.pretrained_cfg
    x = inputs(model)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        expected = listed(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert len(intermediates) == len(expected) == len(model.feature_info)
        for got, want in zip(intermediates, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for got, want in zip(getter(x), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        chosen = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert [t.shape for t in last_two] == [t.shape for t in expected[-2:]]
    assert [t.shape for t in chosen] == [expected[0].shape, expected[-1].shape]
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="feature_cls"):
        create(name, features_only=True, feature_cls="graph")


@pytest.mark.parametrize("name", DVT_NAMES)
def test_dvt_features_are_the_last_stage_blocks(name):
    """A cascade's features_only: timm's FeatureGetterNet over forward_intermediates, one map per block of the
    last stage (the modules feature_info names), class token dropped, on that stage's token grid."""
    torch.manual_seed(5)
    model = create(name, depth=3).eval()
    torch.manual_seed(5)
    getter = create(name, depth=3, features_only=True).eval()
    assert isinstance(getter, FeatureGetterNet)
    assert getter.default_cfg is getter.pretrained_cfg and "classifier" not in getter.pretrained_cfg
    block_outputs = {}

    def keep_tokens(index, module, args, output):  # a block returns (tokens, attention logits)
        block_outputs.setdefault(index, output[0])

    for index, info in enumerate(model.feature_info):
        model.get_submodule(info["module"]).register_forward_hook(partial(keep_tokens, index))
    x = inputs(model)
    grid = model.config.grids[-1]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = getter(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        normed_last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        chosen = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    channels, reductions = getter.feature_info.channels(), getter.feature_info.reduction()
    assert len(features) == len(intermediates) == len(block_outputs) == len(channels) == model.config.depth
    for index, (got, from_getter) in enumerate(zip(intermediates, features)):
        assert got.shape == (2, channels[index], grid, grid) and x.shape[-1] // reductions[index] == grid
        # the block's tokens, grid positions row by row, as channels of a map
        expected = block_outputs[index][:, 1:].transpose(1, 2).reshape(got.shape)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(from_getter, got, rtol=0, atol=0)  # pruned to a backbone: the same features
    # the last block's tokens under the last norm are forward_features' grid tokens
    torch.testing.assert_close(normed_last[0], final[:, 1:], rtol=0, atol=0)
    for got, expected in zip(chosen, (intermediates[0], intermediates[-1])):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", ["dvt_t2t_vit_fmnist", "dvt_deit_small"])
def test_pruned_cascade_keeps_its_taps_and_trains_every_parameter(name):
    """timm's pruning contract: the taps kept are unchanged, and every parameter left reaches them."""
    model = create(name, depth=3).eval()
    x = inputs(model)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    take = model.prune_intermediate_layers([1], prune_norm=True)
    assert len(model.stage(model.num_exits - 1).blocks) == 2 and model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, indices=take, intermediates_only=True)[0], taps[1])
    features = model.train().forward_intermediates(x, indices=take, intermediates_only=True)
    sum(f.sum() for f in features).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", TRUNK_MODELS)
def test_pruned_trunk_keeps_its_taps_and_trains_every_parameter(name):
    """timm's pruning contract on a ResNet trunk: cut after a tap, the trunk ends at that tap's map (the VT
    modules or FPN that read the cut stages go with them), and every parameter left reaches the features."""
    model = create(name).eval()
    x = inputs(model)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        whole = model(x)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([len(taps) - 1], prune_head=False)
        torch.testing.assert_close(kept(x), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prune_head=True"):
        copy.deepcopy(model).prune_intermediate_layers([1], prune_head=False)
    for index in range(len(taps) - 1):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([index])
        assert take == [index] and pruned.num_classes == 0 and len(pruned.feature_info) == index + 1
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_features(x), taps[index], rtol=0, atol=0)
            torch.testing.assert_close(pruned(x), taps[index], rtol=0, atol=0)
        features = pruned.train().forward_intermediates(x, indices=take, intermediates_only=True)
        (features[0].sum() + pruned.forward_features(x).sum()).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_model_traces_with_torch_fx(name):
    """timm's FX feature extraction: the input checks, DVT's T2T soft split and its performer attention are
    leaf calls (timm's notrace functions), run on the batch; the traced model computes what the model does,
    and in training mode (every exit of a DVT) its backward reaches every parameter."""
    model = create(name).eval()
    tracer = torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions()))
    traced = torch.fx.GraphModule(model, tracer.trace(model))
    x = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects images"):
        traced(x[..., 1:])
    model.train()
    traced = torch.fx.GraphModule(model, tracer.trace(model))
    outputs = traced(x)
    sum(o.float().mean() for o in (outputs if isinstance(outputs, tuple) else (outputs,))).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_other_channel_counts_get_no_statistics():
    cfg = create("dvt_t2t_vit_fmnist", in_chans=2).pretrained_cfg
    assert cfg["input_size"] == (2, 28, 28) and cfg["mean"] == (0.0, 0.0) and cfg["std"] == (1.0, 1.0)


def test_pretrained_cfg_overlay_is_applied():
    model = create("resnet_fmnist", pretrained_cfg_overlay={"crop_pct": 0.9})
    assert model.pretrained_cfg["crop_pct"] == 0.9 and model.pretrained_cfg["input_size"] == (1, 28, 28)


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if "fmnist" in n])
def test_fashion_mnist_models_get_its_transform(name):
    model = timm.create_model(name)
    config = resolve_data_config(model=model)
    assert config["input_size"] == (1, 28, 28)
    assert config["mean"] == (FASHION_MNIST_MEAN,) and config["std"] == (FASHION_MNIST_STD,)
    grey = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    got = create_transform(**config)(Image.fromarray(grey, mode="L")).numpy()
    np.testing.assert_allclose(got, normalise_fashion_mnist(grey[None])[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if "fmnist" not in n and n != "vt_fpn_r50"])
def test_imagenet_models_get_the_release_eval_transform(name):
    from dvt_shared.data_config import default_data_config
    from dvt_shared.transforms import eval_array

    model = timm.create_model(name, **({"depth": 1} if name in list_model_names(cascade=True) else {}))
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224)
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    got = create_transform(**config)(rgb)
    data = default_data_config(model.config)
    torch.testing.assert_close(got, torch.from_numpy(eval_array(rgb, data)), rtol=0, atol=0)


def test_contract_in_both_backends(backend):
    """The same public names and behaviour in PyTorch and MindSpore (a DVT and a VT-ResNet)."""
    from dvt_shared.models import get_model_config

    for name in ("dvt_t2t_vit_fmnist", "vt_resnet_fmnist"):
        config = get_model_config(name, **SMALL[name])
        model = backend.build(config)
        x = backend.tensor(np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32))
        out = backend.numpy(backend.call(model, x))
        assert out.shape == (2, config.num_classes)
        np.testing.assert_array_equal(backend.numpy(model.forward_head(model.forward_features(x))), out)
        np.testing.assert_array_equal(backend.exits(model, x)[-1], out)
        assert model.pretrained_cfg == create(name).pretrained_cfg
        model.reset_classifier(3)
        assert backend.numpy(backend.call(model, x)).shape == (2, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert backend.numpy(backend.call(model, x)).shape == (2, model.num_features)


def test_create_model_and_list_models_as_mindcv_users_expect(backend, tmp_path):
    from dvt_shared.weight_format import WeightMetadata, save_canonical
    from dvt_torch.convert import to_canonical

    assert backend.package.list_models() == ALL_NAMES
    assert backend.package.list_models("vt_*") == ["vt_fpn_r50", "vt_resnet18", "vt_resnet34", "vt_resnet_fmnist"]
    torch.manual_seed(4)
    source = dvt_torch.create_model("vt_resnet_fmnist", **SMALL["vt_resnet_fmnist"])
    tensors = to_canonical(source)
    path = tmp_path / "vt.safetensors"
    save_canonical(path, tensors, WeightMetadata(config=source.config))
    model = backend.package.create_model("vt_resnet_fmnist", checkpoint_path=path, **SMALL["vt_resnet_fmnist"])
    assert type(model).__name__ == "VTResNet" and model.num_classes == 10
    loaded = backend.convert.to_canonical(model)
    assert all(np.array_equal(loaded[key], tensors[key]) for key in tensors)
    if backend.name == "mindspore":  # and its own checkpoint format
        backend.package.save_weights(model, tmp_path / "vt.ckpt")
        again = backend.package.create_model(
            "vt_resnet_fmnist", checkpoint_path=tmp_path / "vt.ckpt", **SMALL["vt_resnet_fmnist"]
        )
        assert all(np.array_equal(backend.convert.to_canonical(again)[key], tensors[key]) for key in tensors)
    with pytest.raises(ValueError, match=r"head\.weight: expected \(3, 16\) vs got \(10, 16\)"):
        backend.package.create_model(
            "vt_resnet_fmnist", num_classes=3, checkpoint_path=path, **SMALL["vt_resnet_fmnist"]
        )
    with pytest.raises(ValueError, match="cannot tell the weight format of .*vt.onnx"):
        backend.package.create_model("vt_resnet_fmnist", checkpoint_path=tmp_path / "vt.onnx")
    assert backend.package.create_model("dvt_t2t_vit_fmnist", num_classes=0, depth=1).num_classes == 0
