"""VT layers and models: the paper's equations against NumPy in both backends, the feature-map
layout, input checks, timm's key layout, conversion, graph mode, training and evaluation."""
import argparse
import json

import numpy as np
import pytest
import torch

from dvt_shared.datasets import FASHION_MNIST_FILES, write_idx
from dvt_shared.error_bounds import computation_blocks
from dvt_shared.models import get_model_config, list_model_names, model_gflops
from dvt_shared.vt import VTSpec
from dvt_shared.weight_format import WeightMetadata, load_canonical, save_canonical
from tests.bounds import assert_close

# A VT-ResNet small enough to train for a few steps in a test.
TINY_VT = json.dumps({"trunk": {"channels": [8, 8, 16, 16], "layers": [1, 1, 1, 1], "stem_width": 8},
                      "vt": {"tokens": 4, "token_dim": 32}})
TINY_RESNET = json.dumps({"trunk": {"channels": [8, 8, 16, 16], "layers": [1, 1, 1, 1], "stem_width": 8}})
TINY_FPN = {"trunk": {"layers": [1, 1, 1, 1], "channels": [4, 4, 8, 8]}, "vt": {"tokens": 2, "token_dim": 16},
            "fpn_channels": 8, "img_size": (40, 56), "num_classes": 3}


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def weights(layer, backend, seed: int, scale: float = 0.3) -> dict[str, np.ndarray]:
    """Seeded weights of a visible scale, loaded into `layer`; returned by key."""
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32)
               for k, v in backend.convert.to_canonical(layer).items()}
    backend.convert.from_canonical(layer, tensors)
    return tensors


SPEC = VTSpec(tokens=4, token_dim=12)
CHANNELS, POSITIONS = 8, 15


def features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, POSITIONS, CHANNELS)).astype(np.float32)


def tokens(seed: int = 1, width: int = SPEC.token_dim) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, SPEC.tokens, width)).astype(np.float32)


def test_filter_tokenizer_is_the_paper_equation(backend):
    layer = backend.vt.FilterTokenizer(CHANNELS, SPEC)
    w = weights(layer, backend, 0)
    x = features()
    attention = softmax(x @ w["attention.weight"].T, axis=1)  # softmax over the HW positions
    expected = attention.transpose(0, 2, 1) @ x @ w["value.weight"].T
    assert_close(backend.run(layer, x), expected, 1)


def test_recurrent_tokenizer_is_the_paper_equation(backend):
    layer = backend.vt.RecurrentTokenizer(CHANNELS, SPEC)
    w = weights(layer, backend, 1)
    x, t_in = features(), tokens()
    w_r = t_in @ w["token_to_filter.weight"].T  # W_R = T_in W_{T->R}, one C-wide row per token
    attention = softmax(x @ w_r.transpose(0, 2, 1), axis=1)
    expected = attention.transpose(0, 2, 1) @ x @ w["value.weight"].T
    assert_close(backend.run(layer, x, t_in), expected, 1)


@pytest.mark.parametrize("scale", ["none", "inverse_sqrt"])
def test_transformer_is_the_paper_equation(backend, scale):
    spec = VTSpec(tokens=4, token_dim=12, attention_scale=scale)
    layer = backend.vt.VTTransformer(spec)
    w = weights(layer, backend, 2)
    t = tokens()
    factor = spec.qk_dim**-0.5 if scale == "inverse_sqrt" else 1.0
    logits = (t @ w["key.weight"].T) @ (t @ w["query.weight"].T).transpose(0, 2, 1) * factor
    t_mid = t + softmax(logits, axis=-1) @ t  # each token a weighted average of the tokens
    expected = t_mid + np.maximum(t_mid @ w["ff1.weight"].T, 0) @ w["ff2.weight"].T
    assert_close(backend.run(layer, t), expected, 1)


def test_projector_is_the_paper_equation(backend):
    """Evaluated as X (T W_K W_Q^T)^T, it equals the paper's (X W_Q)(T W_K)^T."""
    layer = backend.vt.Projector(CHANNELS, SPEC)
    w = weights(layer, backend, 3)
    x, t = features(), tokens()
    logits = (x @ w["query.weight"].T) @ (t @ w["key.weight"].T).transpose(0, 2, 1)
    expected = x + softmax(logits, axis=-1) @ (t @ w["value.weight"].T)
    assert_close(backend.run(layer, x, t), expected, 1)


def test_value_projections_only_when_widths_differ(backend):
    same = VTSpec(tokens=4, token_dim=CHANNELS)
    assert backend.vt.FilterTokenizer(CHANNELS, same).value is None
    assert backend.vt.Projector(CHANNELS, same).value is None
    assert backend.vt.RecurrentTokenizer(CHANNELS, VTSpec(4, CHANNELS, value_projection="always")).value is not None
    # without a projection a token is a convex combination of the positions: inside their range
    layer = backend.vt.FilterTokenizer(CHANNELS, same)
    weights(layer, backend, 4)
    x = features()
    out = backend.run(layer, x)
    assert (out <= x.max(axis=1, keepdims=True) + 1e-6).all() and (out >= x.min(axis=1, keepdims=True) - 1e-6).all()


def test_feature_map_layout_is_a_transpose(backend):
    maps = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (B, C, H, W)
    positions = backend.vt.to_positions(backend.tensor(maps))
    got = backend.numpy(positions)
    assert got.shape == (2, 20, 3)
    assert got[1, 2 * 5 + 3].tolist() == maps[1, :, 2, 3].tolist()  # row h*W + w holds that pixel's channels
    back = backend.vt.to_map(positions, 4, 5)
    np.testing.assert_array_equal(back.numpy() if backend.name == "torch" else back.asnumpy(), maps)


def test_last_module_has_no_projector_and_others_do(backend):
    model = backend.package.create_model("vt_resnet_fmnist", vt_modules=3)
    assert [m.projector is not None for m in model.vt] == [True, True, False]
    assert [m.recurrent for m in model.vt] == [False, True, True]


@pytest.mark.parametrize("shape,dtype,match", [
    ((2, 3, 28, 28), np.float32, "3 channels instead of 1"),
    ((2, 1, 32, 28), np.float32, "32x28 pixels instead of 28x28"),
    ((1, 28, 28), np.float32, "3 dimensions instead of 4"),
    ((2, 1, 28, 28), np.int32, "floating point"),
])
def test_wrong_input_rejected(backend, shape, dtype, match):
    model = backend.package.create_model("vt_resnet_fmnist")
    x = np.zeros(shape, dtype)
    tensor = backend.tensor(x)
    with pytest.raises((ValueError, TypeError), match=match):
        model(tensor)
    with pytest.raises(TypeError, match="must be a"):
        model(x)


def test_fpn_names_its_expected_height_and_width(backend):
    model = backend.package.create_model("vt_fpn_r50", **TINY_FPN)
    x = np.zeros((1, 3, 56, 40), np.float32)
    with pytest.raises(ValueError, match=r"\(B, 3, 40, 56\).*56x40 pixels instead of 40x56"):
        model(backend.tensor(x))


def test_unknown_name_lists_the_registered_ones(backend):
    with pytest.raises(ValueError, match="unknown model name 'vt_resnet_99'.*vt_resnet18.*vt_resnet_fmnist"):
        backend.package.create_model("vt_resnet_99")


# ---------------------------------------------------------------- PyTorch: timm layout, gradients


def test_trunks_are_timms_resnets():
    import timm

    from dvt_shared.vt import plain_resnet
    from dvt_torch import ResNet, create_model
    from dvt_torch.convert import to_canonical

    for vt_name, timm_name in (("vt_resnet18", "resnet18"), ("vt_resnet34", "resnet34"), ("vt_fpn_r50", "resnet50")):
        reference = {k: v.shape for k, v in timm.create_model(timm_name, pretrained=False).state_dict().items()}
        ours = create_model(vt_name, img_size=(64, 64) if vt_name == "vt_fpn_r50" else 64).state_dict()
        trunk = {k: v.shape for k, v in ours.items() if k.startswith(("conv1", "bn1", "layer"))}
        assert trunk == {k: s for k, s in reference.items() if k in trunk} and set(trunk) <= set(reference)
        assert {k.split(".")[0] for k in reference} - {k.split(".")[0] for k in trunk} <= {"layer4", "fc"}
    # the plain ResNet-18 is timm's, key for key and output for output
    timm_model = timm.create_model("resnet18", pretrained=False).eval()
    ours = ResNet(plain_resnet(get_model_config("vt_resnet18", img_size=64))).eval()
    ours.load_state_dict(timm_model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_model(x), rtol=0, atol=0)
    assert "layer1.0.bn1.num_batches_tracked" not in to_canonical(ours)


def test_every_parameter_receives_a_gradient():
    """No output is discarded: every weight, the last module's included, reaches the loss."""
    from dvt_torch import create_model

    model = create_model("vt_resnet_fmnist").train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                # timm zero-initialises each block's last scale, which blocks gradients behind it
                module.weight.fill_(1.0)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


# ---------------------------------------------------------------- MindSpore: names, graph mode, checkpoints


@pytest.mark.parametrize("name,overrides", [("vt_resnet_fmnist", {}), ("resnet_fmnist", {}), ("vt_resnet18", {}),
                                            ("vt_fpn_r50", TINY_FPN)])
def test_mindspore_names_are_the_pytorch_keys(name, overrides):
    import dvt_mindspore
    from dvt_mindspore.convert import mindspore_names
    from dvt_mindspore.convert import to_canonical as ms_canonical

    config = get_model_config(name, **overrides)
    ms_model = dvt_mindspore.build_model(config)
    ours = {k: v.shape for k, v in ms_canonical(ms_model).items()}
    names = mindspore_names(ours)
    assert sorted(names.values()) == sorted(n for n, _ in ms_model.parameters_and_names())
    assert names["bn1.running_var"] == "bn1.moving_variance" and names["bn1.weight"] == "bn1.gamma"


@pytest.mark.parametrize("name,overrides", [("vt_resnet_fmnist", {}), ("vt_fpn_r50", TINY_FPN)])
def test_mindspore_graph_mode_equals_pynative(name, overrides):
    import mindspore as ms

    import dvt_mindspore

    config = get_model_config(name, **overrides)
    model = dvt_mindspore.build_model(config)
    model.set_train(False)
    size = config.img_size if isinstance(config.img_size, tuple) else (config.img_size,) * 2
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, config.in_chans, *size)).astype(np.float32))
    eager = model(x)
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = model(x)
    assert_close(graph.asnumpy(), eager.asnumpy(), computation_blocks(config))


@pytest.mark.parametrize("cin,cout,kernel,stride,padding,bias", [
    (3, 8, 7, 2, 3, False), (8, 16, 3, 1, 1, True), (8, 16, 3, 2, 1, False), (8, 8, 1, 2, 0, True),
])
def test_mindspore_convolution_is_pytorchs(cin, cout, kernel, stride, padding, bias):
    """The trunk's convolution (unfold + matmul on CPU for kernels above 1x1, the native kernel
    otherwise) gives PyTorch's Conv2d output, in graph mode and in PyNative."""
    import mindspore as ms

    from dvt_mindspore.layers import UnfoldConv2d

    conv = UnfoldConv2d(cin, cout, kernel, stride, padding, bias)
    conv.set_train(False)
    assert conv.unfolded == (kernel > 1 and ms.get_context("device_target") == "CPU")
    reference = torch.nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)
    x = np.random.default_rng(5).standard_normal((3, cin, 28, 28)).astype(np.float32)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(conv.weight.asnumpy()))
        if bias:
            reference.bias.copy_(torch.from_numpy(np.random.default_rng(6).standard_normal(cout).astype(np.float32)))
            conv.bias.set_data(ms.Tensor(reference.bias.numpy()))
        expected = reference(torch.from_numpy(x)).numpy()
    for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
        ms.set_context(mode=mode)
        assert_close(conv(ms.Tensor(x)).asnumpy(), expected, 1)


def test_ckpt_round_trip_with_batchnorm_statistics(tmp_path):
    import mindspore as ms

    import dvt_mindspore
    from dvt_mindspore import from_canonical, load_ckpt, save_ckpt, to_canonical

    model = dvt_mindspore.create_model("vt_resnet_fmnist")
    tensors = {k: np.random.default_rng(0).random(v.shape).astype(np.float32) for k, v in to_canonical(model).items()}
    from_canonical(model, tensors)
    save_ckpt(model, tmp_path / "vt.ckpt")
    back = load_ckpt(tmp_path / "vt.ckpt")
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    fresh = dvt_mindspore.create_model("vt_resnet_fmnist")
    not_loaded, unused = ms.load_param_into_net(fresh, ms.load_checkpoint(str(tmp_path / "vt.ckpt")))
    assert not_loaded == [] and unused == []
    np.testing.assert_array_equal(fresh.bn1.moving_mean.asnumpy(), tensors["bn1.running_mean"])


def test_canonical_file_records_a_vt_config(tmp_path):
    from dvt_torch import build_model
    from dvt_torch.convert import from_canonical, to_canonical

    config = get_model_config("vt_resnet_fmnist")
    metadata = WeightMetadata(config=config, exit_flops=list(model_gflops(config)))
    save_canonical(tmp_path / "vt.safetensors", to_canonical(build_model(config)), metadata)
    tensors, loaded = load_canonical(tmp_path / "vt.safetensors")
    assert loaded == metadata and loaded.config == config
    from_canonical(build_model(loaded.config), tensors)
    with pytest.raises(ValueError, match="exit_flops has 2 entries but config vt_resnet_fmnist has 1 exits"):
        WeightMetadata(config=config, exit_flops=[1.0, 2.0])


# ---------------------------------------------------------------- training, evaluation, the command line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Fashion-MNIST-shaped synthetic data whose class is the row of a bright bar."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, n, seed in (("train", 256, 0), ("test", 100, 1)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 3 + 2 * label:5 + 2 * label, 4:24] = 250
        write_idx(root / FASHION_MNIST_FILES[f"{split}_images"], images)
        write_idx(root / FASHION_MNIST_FILES[f"{split}_labels"], labels)
    return str(root)


def _train(out, data_dir, model: str, overrides: str, *extra):
    from dvt_torch.train import add_train_arguments, train

    args = add_train_arguments(argparse.ArgumentParser()).parse_args([
        "--model", model, "--model-overrides", overrides, "--data-dir", data_dir, "--batch-size", "32",
        "--epochs", "5", "--lr", "1e-2", "--warmup-epochs", "0.5", "--crop-padding", "0", "--threads", "1",
        "--no-progress", "--out", str(out), *extra,
    ])
    return train(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("runs")
    metrics = {name: _train(root / name, data_dir, name, overrides)
               for name, overrides in (("vt_resnet_fmnist", TINY_VT), ("resnet_fmnist", TINY_RESNET))}
    return root, metrics


def test_training_learns_and_writes_a_vt_file(trained):
    root, metrics = trained
    log = [json.loads(line) for line in (root / "vt_resnet_fmnist" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and len(log[0]["test_acc"]) == 1
    # Which row holds the bar is all there is to learn, and tokens carry no position: slow, but above chance (10%).
    assert log[-1]["loss"] < log[0]["loss"] - 0.3 and metrics["vt_resnet_fmnist"]["test_acc"][0] > 15.0
    tensors, metadata = load_canonical(root / "vt_resnet_fmnist" / "final.safetensors")
    config = get_model_config("vt_resnet_fmnist", num_classes=10, **json.loads(TINY_VT))
    assert metadata.config == config and metadata.exit_flops == pytest.approx(list(model_gflops(config)))
    assert not any(key.endswith("num_batches_tracked") for key in tensors)


def test_segmentation_model_is_not_trained(tmp_path, data_dir):
    with pytest.raises(ValueError, match="vt_fpn_r50 is a segmentation model"):
        _train(tmp_path / "fpn", data_dir, "vt_fpn_r50", "{}")


def test_evaluate_compares_a_vt_model_with_its_baseline(trained, data_dir, tmp_path):
    from dvt_cli.evaluate import evaluate, fashion_mnist, render
    from dvt_torch import build_model

    root, metrics = trained
    report, _ = evaluate(str(root / "vt_resnet_fmnist" / "final.safetensors"),
                         str(root / "resnet_fmnist" / "final.safetensors"),
                         fashion_mnist(data_dir), tmp_path, agreement=True)
    vt, resnet = report["classifiers"]
    assert (vt["model"], resnet["model"]) == ("vt_resnet_fmnist", "resnet_fmnist")
    # the training loop's own test accuracy, up to a sample the other batching may tip
    assert abs(vt["accuracy"] - metrics["vt_resnet_fmnist"]["test_acc"][0]) <= 1.0 and resnet["accuracy"] > 30.0
    tiny = build_model(get_model_config("vt_resnet_fmnist", **json.loads(TINY_VT)))
    assert vt["params"] == sum(p.numel() for p in tiny.parameters())
    assert vt["gflops"] == pytest.approx(model_gflops(get_model_config("vt_resnet_fmnist", **json.loads(TINY_VT)))[0])
    mindspore = report["agreement"]["mindspore"]
    assert mindspore["same_prediction"] == mindspore["images"] == 100
    assert mindspore["max_abs_prob_delta"] < 1e-5
    assert "| vt_resnet_fmnist | vt_resnet |" in render(report)
    assert {p.name for p in tmp_path.iterdir()} >= {"evaluation.md", "evaluation.json", "accuracy_vs_gflops.png"}


def test_convert_command_round_trips_vt_weights(tmp_path):
    from dvt_cli import main
    from dvt_torch import create_model
    from dvt_torch.convert import to_canonical

    config = get_model_config("vt_resnet_fmnist")
    tensors = to_canonical(create_model("vt_resnet_fmnist"))
    save_canonical(tmp_path / "vt.safetensors", tensors, WeightMetadata(config=config))
    assert main(["convert", str(tmp_path / "vt.safetensors"), str(tmp_path / "vt.ckpt")]) == 0
    assert main(["convert", str(tmp_path / "vt.ckpt"), str(tmp_path / "back.safetensors"),
                 "--model", "vt_resnet_fmnist"]) == 0
    back, metadata = load_canonical(tmp_path / "back.safetensors")
    assert metadata.config == config and all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_every_vt_name_is_a_timm_model():
    import timm

    for name in list_model_names(cascade=False):
        assert timm.is_model(name)
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("vt_resnet_fmnist", pretrained=True)
