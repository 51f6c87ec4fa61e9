"""Bad input gets a clear error: every case checks the exception type and that the message
names the problem (expected vs received where there is one).

Model cases run once per backend (PyTorch eager, MindSpore graph mode; images also on the
ONNX Runtime engine); file, exit-policy and command-line cases once. Covered elsewhere and
not repeated here: unknown model names (test_dvt_model), missing,
extra and mis-shaped tensors listed at once (test_convert), truncated or corrupt
safetensors and .pth files (test_weight_format, test_checkpoint), a shipped weight file
whose sha256 differs from weights/manifest.json (test_shipped_weights), budgets outside
the exits' costs and NaN logits in the policy (test_exit_policy), NaN logits in the engines
(test_engine), pickled code in checkpoints (test_checkpoint).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dvt_torch
from dvt_cli import CommandError, main
from dvt_mindspore import checkpoint as ms_checkpoint
from dvt_mindspore.export import MindIRAdaptiveDVT
from dvt_onnx import OnnxAdaptiveDVT
from dvt_shared import StageSpec, StemSpec, get_model_config, softmax
from dvt_shared.calibration import check_calibration_data, thresholds_for_accuracy, thresholds_for_budget
from dvt_shared.datasets import FASHION_MNIST_FILES, write_idx
from dvt_shared.flops import exit_gflops
from dvt_shared.io_utils import sha256_file
from dvt_shared.weight_format import WeightMetadata, save_canonical
from dvt_torch import convert as torch_convert
from dvt_torch.export import export_onnx
from tests.bounds import assert_chosen_close, assert_exits_close

CONFIG = get_model_config("dvt_t2t_vit_fmnist", embed_dim=24, depth=1, num_heads=2, token_dim=8)
THRESHOLDS = [0.3, 0.3, -1e8]


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return dvt_torch.DVT(CONFIG).eval()


@pytest.fixture(scope="module")
def model(backend, torch_model):
    """`torch_model`'s weights in `backend`, with an engine over them (MindSpore: the module's engines share
    its stage graphs, which compile once for any batch size)."""
    twin = backend.twin(torch_model)
    backend.engine(twin, THRESHOLDS)
    return twin


def images(count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 28, 28)).astype(np.float32)


def with_value(value: float, index: int) -> np.ndarray:
    x = images()
    x[index, 0, 5, 7] = value
    return x


# --- images ------------------------------------------------------------------------------

BAD_IMAGES = {
    "rank 3": (lambda: images()[0], ValueError, r"got \(1, 28, 28\): 3 dimensions instead of 4"),
    "rank 5": (lambda: images()[None], ValueError, "5 dimensions instead of 4"),
    "channels": (lambda: np.zeros((2, 3, 28, 28), np.float32), ValueError,
                 r"\(B, 1, 28, 28\) with B >= 1, got \(2, 3, 28, 28\): 3 channels instead of 1"),
    "height and width": (lambda: np.zeros((2, 1, 32, 27), np.float32), ValueError, "32x27 pixels instead of 28x28"),
    "empty batch": (lambda: np.zeros((0, 1, 28, 28), np.float32), ValueError, "an empty batch"),
    "int": (lambda: np.zeros((2, 1, 28, 28), np.int32), TypeError, "images must be floating point, got .*[Ii]nt32"),
    "bool": (lambda: np.zeros((2, 1, 28, 28), bool), TypeError, "images must be floating point, got .*[Bb]ool"),
    "float64": (lambda: images().astype(np.float64), TypeError,
                "images are .*[Ff]loat64 but the model computes in .*[Ff]loat32"),
    "NaN": (lambda: with_value(np.nan, 1), ValueError, r"1 of 3 images hold NaN or Inf values \(batch index 1\)"),
    "Inf": (lambda: with_value(-np.inf, 2), ValueError, r"1 of 3 images hold NaN or Inf values \(batch index 2\)"),
}


@pytest.mark.parametrize("case", BAD_IMAGES, ids=str)
def test_bad_images_are_refused_by_every_entry_point(backend, model, case):
    make, error, message = BAD_IMAGES[case]
    x = backend.tensor(make())
    for entry in (lambda: model(x), lambda: model.forward_exits(x), lambda: model.forward_stage(0, x),
                  lambda: backend.engine(model, THRESHOLDS).predict(x)):
        with pytest.raises(error, match=message):
            entry()


@pytest.fixture(scope="module")
def onnx_dir(torch_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(torch_model, folder)
    return folder


@pytest.mark.parametrize("case", BAD_IMAGES, ids=str)
def test_bad_images_are_refused_by_the_onnx_engine(onnx_dir, case):
    make, error, message = BAD_IMAGES[case]
    with pytest.raises(error, match=message):
        OnnxAdaptiveDVT(onnx_dir, THRESHOLDS).predict(make())


def test_images_must_be_a_tensor(backend, model):
    expected = "torch.Tensor" if backend.name == "torch" else "mindspore.Tensor"
    with pytest.raises(TypeError, match=f"images must be a {expected}, got list"):
        model(images().tolist())


def test_onnx_engine_images_must_be_a_numpy_array(onnx_dir):
    with pytest.raises(TypeError, match="images must be a numpy array, got Tensor"):
        OnnxAdaptiveDVT(onnx_dir, THRESHOLDS).predict(torch.zeros(1, 1, 28, 28))


def test_other_memory_layouts_give_the_same_logits(backend, model):
    """The model's exits run eagerly (MindSpore: PyNative), the engine in its graph mode."""
    x = images(4, seed=1)
    layouts = backend.layouts(x)
    backend.mode(backend.modes[0])
    expected = backend.exits(model, backend.tensor(x))
    for layout, other in layouts.items():
        assert_exits_close(backend.exits(model, other), expected, CONFIG.depth, label=f"{layout}, exit")
    engine = backend.engine(model, THRESHOLDS)  # graph mode
    reference = engine.predict(backend.tensor(x))
    for layout, other in layouts.items():
        prediction = engine.predict(other)
        np.testing.assert_array_equal(prediction.exit_index, reference.exit_index, err_msg=layout)
        assert_chosen_close(prediction.logits, reference.logits, reference.exit_index, CONFIG.depth, label=layout)


def test_a_batch_larger_than_max_batch_goes_through_in_chunks(backend, model):
    """A batch too large to run at once never reaches a stage whole: it is cut into max_batch chunks."""
    x = backend.tensor(images(37, seed=2))
    engine = backend.engine(model, [0.5, 0.5, -1e8], max_batch=8)
    seen = []
    run_stage = engine.run_stage

    def counting(index, batch, state):
        seen.append(batch.shape[0])
        return run_stage(index, batch, state)

    engine.run_stage = counting
    chunked = engine.predict(x)
    assert seen and max(seen) <= 8
    whole = backend.engine(model, [0.5, 0.5, -1e8], max_batch=64).predict(x)
    np.testing.assert_array_equal(chunked.exit_index, whole.exit_index)
    assert_chosen_close(chunked.logits, whole.logits, whole.exit_index, CONFIG.depth)


@pytest.mark.parametrize("max_batch", [0, -4, 2.5, True])
def test_max_batch_must_be_a_positive_integer(backend, model, max_batch):
    with pytest.raises(ValueError, match=f"max_batch must be an integer >= 1, got {max_batch!r}"):
        backend.engine(model, THRESHOLDS, max_batch=max_batch)


# --- models and weights ---------------------------------------------------------------------

# 0 is timm's "no classifier" (tests/test_timm_contract.py).
@pytest.mark.parametrize("num_classes", [-3, 1.5])
def test_class_count_must_be_positive(backend, num_classes):
    with pytest.raises(ValueError, match=f"num_classes must be a positive integer, got {num_classes}"):
        backend.create_model("dvt_t2t_vit_fmnist", num_classes=num_classes)


def test_weights_with_another_class_count_name_every_head(backend, torch_model):
    tensors = torch_convert.to_canonical(torch_model)  # 10 classes
    model = backend.build(CONFIG.replace(num_classes=4))
    with pytest.raises(ValueError) as info:
        backend.convert.from_canonical(model, tensors, source="ten.safetensors")
    message = str(info.value)
    assert "ten.safetensors do not match the model: 0 missing, 0 unexpected, 6 mis-shaped" in message
    for stage in ("less_less_token", "less_token", "normal_token"):
        assert f"{stage}.head.weight: expected (4, 24) vs got (10, 24)" in message
        assert f"{stage}.head.bias: expected (4,) vs got (10,)" in message


def test_weights_that_are_no_mapping_are_named(backend, torch_model):
    tensors = list(torch_convert.to_canonical(torch_model).values())
    with pytest.raises(TypeError, match="the weights must map tensor names to arrays .*got list"):
        backend.convert.from_canonical(backend.build(CONFIG), tensors)


def test_reuse_state_of_another_batch_is_named(backend, model):
    _, state = model.forward_stage(0, backend.tensor(images(3)))
    with pytest.raises(ValueError, match="ReuseState's features are of 3 images, the batch has 2"):
        model.forward_stage(1, backend.tensor(images(2)), state)


@pytest.mark.parametrize("key,value", [("mlp_ratio", float("nan")), ("mlp_ratio", -2.0),
                                       ("layernorm_eps", float("inf")), ("drop_path_rate", 1.5), ("reuse_dim", 0)])
def test_config_numbers_out_of_range_are_named(backend, key, value):
    with pytest.raises(ValueError, match=f"{key} must be a "):
        backend.create_model("dvt_t2t_vit_fmnist", **{key: value})


def test_weights_of_another_model_list_what_differs(backend):
    patch_stems = tuple(
        StageSpec(stage.name, StemSpec("patch", ((patch, patch, 0),)))
        for stage, patch in zip(CONFIG.stages, (14, 7, 4))
    )
    other = CONFIG.replace(name="patch_tiny", family="deit", stages=patch_stems, pos_embed="learned")
    tensors = torch_convert.to_canonical(dvt_torch.DVT(other))
    with pytest.raises(ValueError) as info:
        backend.convert.from_canonical(backend.build(CONFIG), tensors, source="deit.safetensors")
    message = str(info.value)
    assert "deit.safetensors do not match the model:" in message
    assert "less_less_token.tokens_to_token.attention1.w" in message.split("unexpected keys")[0]  # missing
    assert "less_less_token.patch_embed.proj.weight" in message.split("unexpected keys")[1]  # unexpected


@pytest.fixture(scope="module")
def ckpt_bytes(torch_model, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "w.ckpt"
    ms_checkpoint.save_ckpt(torch_convert.to_canonical(torch_model), path)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_ckpt_is_refused(ckpt_bytes, tmp_path, fraction):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(ckpt_bytes[: int(len(ckpt_bytes) * fraction)])
    with pytest.raises(ValueError, match=f"{path} is not a readable MindSpore checkpoint"):
        ms_checkpoint.load_ckpt(path)


def test_corrupt_ckpt_fails_its_checksum(ckpt_bytes, tmp_path):
    data = bytearray(ckpt_bytes)
    data[len(data) // 2] ^= 0x40  # one flipped bit inside a tensor's bytes
    path = tmp_path / "flipped.ckpt"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path} is damaged: the CRC32 of its contents is 0x[0-9a-f]{{8}}, it was"):
        ms_checkpoint.load_ckpt(path)


def test_directory_where_a_checkpoint_file_is_expected(ckpt_bytes, tmp_path):
    folder = tmp_path / "w.ckpt"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"{folder} is a directory, not a checkpoint"):
        ms_checkpoint.load_ckpt(folder)
    with pytest.raises(IsADirectoryError, match=f"cannot write {folder}: it is a directory"):
        ms_checkpoint.save_ckpt({"w": np.zeros(2, np.float32)}, folder)


def fake_export(folder: Path, fmt: str, suffix: str) -> Path:
    """Stage files with a manifest listing their sha256, as an export writes them (contents aside)."""
    folder.mkdir()
    stages = []
    for index in range(CONFIG.num_exits):
        path = folder / f"stage{index}{suffix}"
        path.write_bytes(f"graph {index}".encode())
        stages.append({"file": path.name, "sha256": sha256_file(path), "inputs": [], "outputs": []})
    manifest = folder / f"dvt_{fmt}.json"
    manifest.write_text(json.dumps({"format": f"dvt-{fmt}-v1", "config": CONFIG.to_dict(), "stages": stages}))
    return manifest


ENGINES = {"onnx": (OnnxAdaptiveDVT, ".onnx"), "mindir": (MindIRAdaptiveDVT, ".mindir")}


@pytest.mark.parametrize("fmt", ENGINES)
def test_exported_graph_whose_sha256_does_not_match_its_manifest(tmp_path, fmt):
    engine, suffix = ENGINES[fmt]
    fake_export(tmp_path / "export", fmt, suffix)
    (tmp_path / "export" / f"stage1{suffix}").write_bytes(b"graph 1, tampered")
    with pytest.raises(ValueError, match=f"stage1{suffix}: sha256 [0-9a-f]{{64}} does not match dvt_{fmt}.json's"):
        engine(tmp_path / "export", THRESHOLDS)


def test_real_export_lists_sha256_and_refuses_a_damaged_graph(onnx_dir, tmp_path):
    manifest = json.loads((onnx_dir / "dvt_onnx.json").read_text())
    assert all(stage["sha256"] == sha256_file(onnx_dir / stage["file"]) for stage in manifest["stages"])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in onnx_dir.iterdir():
        data = path.read_bytes()
        (damaged / path.name).write_bytes(data[: len(data) // 2] if path.name == "stage2.onnx" else data)
    with pytest.raises(ValueError, match="stage2.onnx: sha256 .* the graph was changed or damaged after export"):
        OnnxAdaptiveDVT(damaged, THRESHOLDS)


@pytest.mark.parametrize("fmt", ENGINES)
@pytest.mark.parametrize("damage,error,message", [
    ("no folder", NotADirectoryError, "does not exist; pass the folder written by `dvt export --format"),
    ("file, not folder", NotADirectoryError, "is a file; pass the folder written by `dvt export --format"),
    ("no manifest", FileNotFoundError, "not found: export with `dvt export --format"),
    ("manifest not JSON", ValueError, "is not a valid export manifest"),
    ("other format", ValueError, "is in format 'dvt-other-v1', expected"),
    ("graph missing", FileNotFoundError, "stage0.* listed in .* is missing"),
], ids=["no folder", "file not folder", "no manifest", "manifest not JSON", "other format", "graph missing"])
def test_broken_export_folders_are_named(tmp_path, fmt, damage, error, message):
    engine, suffix = ENGINES[fmt]
    folder = tmp_path / "export"
    manifest = fake_export(folder, fmt, suffix)
    if damage == "no folder":
        folder = tmp_path / "nowhere"
    elif damage == "file, not folder":
        folder = manifest
    elif damage == "no manifest":
        manifest.unlink()
    elif damage == "manifest not JSON":
        manifest.write_text("{ not json")
    elif damage == "other format":
        manifest.write_text(manifest.read_text().replace(f"dvt-{fmt}-v1", "dvt-other-v1"))
    else:
        (folder / f"stage0{suffix}").unlink()
    with pytest.raises(error, match=message):
        engine(folder, THRESHOLDS)


# --- exit policy ----------------------------------------------------------------------------

@pytest.mark.parametrize("thresholds,message", [
    ([0.5, -1e8], r"thresholds must have shape \(3,\), one per exit, got \(2,\)"),
    ([0.5, 0.5, 0.5, -1e8], r"one per exit, got \(4,\)"),
    ([0.5, float("nan"), -1e8], "thresholds must not be NaN"),
], ids=["too few", "too many", "NaN"])
def test_bad_thresholds_are_refused(backend, model, thresholds, message):
    with pytest.raises(ValueError, match=message):
        backend.engine(model, thresholds)


CALIBRATION = softmax(np.random.default_rng(3).normal(size=(3, 40, 10)))
LABELS = np.random.default_rng(4).integers(0, 10, 40)
FLOPS = [1.0, 2.0, 3.0]


def test_calibration_on_one_sample_is_refused():
    for search in (lambda: thresholds_for_budget(CALIBRATION[:, :1], FLOPS, 2.0),
                   lambda: thresholds_for_accuracy(CALIBRATION[:, :1], LABELS[:1], FLOPS, 50.0)):
        with pytest.raises(ValueError, match="calibration needs at least 2 samples, got 1"):
            search()


def test_calibration_with_one_class_is_refused():
    with pytest.raises(ValueError, match="calibration probs have 1 class: every confidence is 1"):
        thresholds_for_budget(np.ones((3, 40, 1)), FLOPS, 2.0)
    with pytest.raises(ValueError, match=r"calibration labels hold a single class \(7\) in 40 samples"):
        thresholds_for_accuracy(CALIBRATION, np.full(40, 7), FLOPS, 50.0)
    check_calibration_data(CALIBRATION, LABELS)  # two or more of each is fine


# --- the dvt command --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(torch_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    tensors = torch_convert.to_canonical(torch_model)
    save_canonical(path, tensors, WeightMetadata(config=CONFIG, exit_flops=list(exit_gflops(CONFIG))))
    return path


def fashion_mnist_like(folder: Path, train_labels: np.ndarray) -> str:
    """The four IDX files, small: train images with the given labels, 20 test images."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, labels in (("train", train_labels), ("test", rng.integers(0, 10, 20))):
        pixels = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(folder / FASHION_MNIST_FILES[f"{split}_images"], pixels)
        write_idx(folder / FASHION_MNIST_FILES[f"{split}_labels"], np.asarray(labels, dtype=np.uint8))
    return str(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return fashion_mnist_like(tmp_path_factory.mktemp("data") / "fmnist", np.arange(40) % 10)


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A path nobody can write, root included: its parent is a regular file."""
    parent = tmp_path / "a_file"
    parent.write_text("not a folder")
    return parent / "out"


def exit_code(argv) -> int:
    """The exit code of `dvt ARGV`: main's return value, or argparse's SystemExit for a bad command line."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def fails(capsys, argv, code: int = 1) -> str:
    """Run `dvt ARGV`, expect exit code `code` and exactly one line on stderr, without a traceback."""
    assert exit_code(argv) == code
    # a progress bar that erased itself with carriage returns leaves no line behind
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"dvt {argv[0]}: error: " if code == 1 else "dvt"), err
    return err


def test_convert_bad_option_value(weights, tmp_path, capsys):
    err = fails(capsys, ["convert", weights, tmp_path / "x.ckpt", "--num-classes", "0"], code=2)
    assert "argument --num-classes: must be a positive integer, got '0'" in err


def test_convert_unwritable_output(weights, blocked, tmp_path, capsys):
    assert "a_file is not a directory" in fails(capsys, ["convert", weights, blocked.with_suffix(".ckpt")])
    folder = tmp_path / "taken.ckpt"
    folder.mkdir()
    assert f"cannot write {folder}: it is a directory" in fails(capsys, ["convert", weights, folder])


def test_convert_directory_as_source(tmp_path, capsys):
    folder = tmp_path / "w.safetensors"
    folder.mkdir()
    assert f"{folder} is a directory, not a weight file" in fails(capsys, ["convert", folder, tmp_path / "x.ckpt"])


def test_train_missing_data(tmp_path, capsys):
    err = fails(capsys, ["train", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run", "--no-progress"])
    assert "Fashion-MNIST file train-images-idx3-ubyte[.gz] not found" in err


def test_train_bad_option_value(tmp_path, capsys):
    assert "argument --epochs: invalid int value: 'many'" in fails(capsys, ["train", "--epochs", "many"], code=2)
def test_train_bad_overrides(data_dir, tmp_path, capsys):
    err = fails(capsys, ["train", "--data-dir", data_dir, "--model-overrides", "{depth: 1", "--batch-size", "8",
                         "--out", tmp_path / "run", "--no-progress"])
    assert "--model-overrides is not valid JSON" in err


def test_train_unwritable_output(blocked, data_dir, capsys):
    err = fails(capsys, ["train", "--data-dir", data_dir, "--out", blocked])
    assert f"cannot create folder {blocked}: " in err and "a_file is a file, not a folder" in err


def test_calibrate_missing_weights(tmp_path, capsys):
    err = fails(capsys, ["calibrate", "--weights", tmp_path / "absent.safetensors"])
    assert "absent.safetensors does not exist" in err


@pytest.mark.parametrize("option,value,message", [
    ("--limit", "0", "argument --limit: must be a positive integer, got '0'"),
    ("--p", "-1", "argument --p: must be a finite number > 0, got '-1'"),
    ("--budget", "nan", "argument --budget: must be a finite number > 0, got 'nan'"),
    ("--split", "all", "argument --split: invalid choice: 'all'"),
], ids=["limit", "p", "budget", "split"])
def test_calibrate_bad_option_value(weights, capsys, option, value, message):
    assert message in fails(capsys, ["calibrate", "--weights", weights, option, value], code=2)


def test_calibrate_budget_outside_the_exits(weights, data_dir, capsys):
    err = fails(capsys, ["calibrate", "--weights", weights, "--data-dir", data_dir, "--budget", "1e-6"])
    assert "--budget 1e-06 is below " in err and "the GFLOPs of the first exit" in err


def test_calibrate_on_one_image_or_one_class(weights, data_dir, tmp_path, capsys):
    one = ["calibrate", "--weights", weights, "--data-dir", data_dir, "--limit", "1",
           "--out", tmp_path / "c.safetensors"]
    assert "calibration needs at least 2 samples, got 1" in fails(capsys, one)
    single = fashion_mnist_like(tmp_path / "single", np.full(30, 4))
    err = fails(capsys, ["calibrate", "--weights", weights, "--data-dir", single, "--out", tmp_path / "c.safetensors"])
    assert "calibration labels hold a single class (4) in 30 samples" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_calibrate_unwritable_output(weights, blocked, capsys):
    err = fails(capsys, ["calibrate", "--weights", weights, "--out", blocked.with_suffix(".safetensors")])
    assert "a_file is not a directory" in err


def test_predict_weights_that_are_a_folder(tmp_path, image_file, capsys):
    err = fails(capsys, ["predict", "--weights", tmp_path, image_file])
    assert f"{tmp_path} is a directory, not a weight file" in err


def test_predict_missing_weights(tmp_path, capsys):
    err = fails(capsys, ["predict", "--weights", tmp_path / "absent.safetensors", tmp_path / "x.png"])
    assert "absent.safetensors does not exist" in err


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "shoe.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("option,value,code,message", [
    ("--backend", "tensorflow", 2, "argument --backend: invalid choice: 'tensorflow'"),
    ("--thresholds", "high,low", 2, "thresholds must be comma-separated numbers, got 'high,low'"),
    ("--thresholds", "0.5,-1e8", 1, r"thresholds must have shape (3,), one per exit, got (2,)"),
    ("--num-classes", "ten", 2, "argument --num-classes: must be a positive integer, got 'ten'"),
], ids=["backend", "thresholds not numbers", "thresholds too few", "num-classes"])
def test_predict_bad_option_value(weights, image_file, capsys, option, value, code, message):
    assert message in fails(capsys, ["predict", "--weights", weights, option, value, image_file], code=code)


def test_predict_file_that_is_no_image(weights, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("not pixels")
    err = fails(capsys, ["predict", "--weights", weights, "--thresholds", "0.5,0.5,-1e8", fake])
    assert f"{fake}: cannot read it as an image" in err


def test_predict_missing_onnx_folder(weights, image_file, tmp_path, capsys):
    argv = ["predict", "--weights", weights, "--thresholds", "0.5,0.5,-1e8", "--backend", "onnx",
            "--onnx-dir", tmp_path / "absent", image_file]
    assert "absent does not exist; pass the folder written by `dvt export --format onnx`" in fails(capsys, argv)


def test_export_missing_weights(tmp_path, capsys):
    err = fails(capsys, ["export", "--weights", tmp_path / "absent.ckpt", "--format", "onnx", "--out", tmp_path / "o"])
    assert "absent.ckpt does not exist" in err


def test_export_bad_option_value(weights, tmp_path, capsys):
    err = fails(capsys, ["export", "--weights", weights, "--format", "tflite", "--out", tmp_path], code=2)
    assert "argument --format: invalid choice: 'tflite'" in err


def test_export_unwritable_output(weights, blocked, capsys):
    err = fails(capsys, ["export", "--weights", weights, "--format", "onnx", "--out", blocked])
    assert "a_file is a file, not a folder" in err


def test_evaluate_missing_weights(data_dir, tmp_path, capsys):
    err = fails(capsys, ["evaluate", "--weights", tmp_path / "absent.safetensors", "--data-dir", data_dir,
                         "--out", tmp_path / "report"])
    assert "absent.safetensors does not exist" in err


def test_evaluate_bad_option_value(weights, capsys):
    err = fails(capsys, ["evaluate", "--weights", weights, "--budget", "3"], code=2)
    assert "unrecognized arguments: --budget 3" in err


def test_evaluate_unwritable_output(weights, blocked, tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text("a file where the report folder should go")
    assert f"cannot write into {report}: it is a file, not a folder" in fails(
        capsys, ["evaluate", "--weights", weights, "--out", report])
    assert "a_file is a file, not a folder" in fails(capsys, ["evaluate", "--weights", weights, "--out", blocked])


def test_demo_missing_data(tmp_path, capsys):
    err = fails(capsys, ["demo", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "report"])
    assert "not found in" in err and "apt-get install dataset-fashion-mnist" in err


def test_demo_bad_option_value(capsys):
    assert "unrecognized arguments: --fast" in fails(capsys, ["demo", "--fast"], code=2)


def test_demo_unwritable_output(blocked, capsys):
    assert "a_file is a file, not a folder" in fails(capsys, ["demo", "--out", blocked])


def test_no_command_and_unknown_command(capsys):
    assert exit_code([]) == 2 and exit_code(["fly"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "required: COMMAND" in lines[0] and "invalid choice: 'fly'" in lines[1]


def test_debug_shows_the_traceback_instead(weights, data_dir, tmp_path):
    with pytest.raises(CommandError, match="absent.safetensors does not exist"):
        main(["predict", "--weights", str(tmp_path / "absent.safetensors"), str(tmp_path / "x.png"), "--debug"])
    with pytest.raises(ValueError, match="calibration needs at least 2 samples"):
        main(["--debug", "calibrate", "--weights", str(weights), "--data-dir", data_dir, "--limit", "1",
              "--out", str(tmp_path / "c.safetensors")])


@pytest.mark.parametrize("where", ["proc", "long name"])
def test_unwritable_outputs_are_found_before_any_work(weights, tmp_path, capsys, monkeypatch, where):
    """os.access passes for root under /proc and for over-long names: only creating a file tells."""
    import dvt_cli.evaluate

    monkeypatch.setattr(dvt_cli.evaluate, "_evaluate", lambda args: pytest.fail("scored before checking --out"))
    out = Path("/proc/dvt-report") if where == "proc" else tmp_path / ("r" * 300)
    assert "cannot create folder" in fails(capsys, ["evaluate", "--weights", weights, "--out", out])
    # 252 characters fit a file name, but not the atomic writer's temporary name beside it.
    target = Path("/proc/c.safetensors") if where == "proc" else tmp_path / ("c" * 240 + ".safetensors")
    assert "cannot write" in fails(capsys, ["convert", weights, target])
    assert target.name not in os.listdir(target.parent)


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    from dvt_cli.images import load_images

    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "eight.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    from dvt_shared.data_config import default_data_config

    paths = [str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png")]
    eight, sixteen = load_images(paths, default_data_config(CONFIG))
    np.testing.assert_array_equal(sixteen, eight)
