"""A user's own images end to end: train, calibrate, evaluate, predict and serve any image folder (grey and RGB)
or parquet files, with the folder's class names and statistics carried by the weights; and every bad data set
refused with a clear message (or, for unreadable and other-kind images, said once)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import numpy as np
import pytest
from PIL import Image

from dvt_cli import main
from dvt_shared.data_config import DataConfig, default_data_config
from dvt_shared.data_sources import DataError, check_classes, load_split, open_data
from dvt_shared.datasets import FASHION_MNIST_CLASSES
from dvt_shared.weight_format import load_canonical, read_canonical_metadata, save_canonical

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "weights", "dvt_t2t_vit_fmnist.safetensors")
TINY = json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 2, "token_dim": 8, "reuse_dim": 8, "reuse_hidden": 16})
CLASSES = ("circle", "cross", "stripes")


def _pattern(kind: int, side: int, rng) -> np.ndarray:
    """A learnable image of class `kind` (0: a bright disc, 1: a cross, 2: stripes) on noise, uint8 (side, side)."""
    y, x = np.mgrid[:side, :side]
    noise = rng.integers(0, 60, (side, side))
    c = side / 2 + rng.uniform(-2, 2, 2)
    shape = [((y - c[0]) ** 2 + (x - c[1]) ** 2) < (side / 4) ** 2,
             (np.abs(y - c[0]) < side / 10) | (np.abs(x - c[1]) < side / 10),
             (y // max(side // 8, 1)) % 2 == 0][kind]
    return np.where(shape, 230, noise).astype(np.uint8)


def make_folder(root, side: int = 28, mode: str = "L", per_class=(12, 4), classes=CLASSES, seed: int = 0):
    """root/train/CLASS/*.png and root/val/CLASS/*.png of generated images (grey, or RGB tinted by class)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                grey = _pattern(k % 3, side, rng)
                image = Image.fromarray(grey, "L")
                if mode == "RGB":
                    tint = np.asarray([(1.0, 0.6, 0.3), (0.3, 1.0, 0.6), (0.6, 0.3, 1.0)][k % 3])
                    image = Image.fromarray((grey[..., None] * tint).astype(np.uint8), "RGB")
                image.save(folder / f"{i}.png")
    return root


def run(*argv) -> int:
    return main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    assert run(*argv) == 1
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def port() -> int:
    """One port for the module's servers: a Serve instance keeps the HTTP port it started with."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_answers(ray_address: str, weights, pngs: list, port: int) -> tuple[list[dict], dict, dict]:
    """`dvt serve` of `weights` on the session's Ray instance: (/v1/predict answers for `pngs`, the v2 model
    metadata, a v2 answer for the first image as UINT8 pixels)."""
    command = [sys.executable, "-m", "dvt_cli", "serve", "--weights", str(weights), "--port", str(port),
               "--ray-address", ray_address, "--replica-cpus", "0.5"]
    log = open(os.path.join(os.path.dirname(str(weights)), "serve.log"), "w+")  # not a pipe: nothing can block it
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"dvt serve did not start: {log.read()[-3000:]}")
                time.sleep(0.5)
        answers = []
        for png in pngs:
            request = urllib.request.Request(f"{base}/v1/predict", data=png.read_bytes(), method="POST")
            with urllib.request.urlopen(request, timeout=60) as response:
                answers.append(json.loads(response.read()))
        name = load_canonical(weights)[1].config.name
        with urllib.request.urlopen(f"{base}/v2/models/{name}", timeout=30) as response:
            metadata = json.loads(response.read())
        with Image.open(pngs[0]) as image:
            pixels = np.asarray(image)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None]
        body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
                                       "data": pixels.reshape(-1).tolist()}]}).encode()
        request = urllib.request.Request(f"{base}/v2/models/{name}/infer", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            v2 = json.loads(response.read())
        return answers, metadata, v2
    finally:
        # SIGTERM drains only once the command has taken it over from Ray, which it says by its "serving" line
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            log.seek(0)
            if "serving " in log.read():
                break
            time.sleep(0.2)
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.parametrize("mode, side", [("L", 28), ("RGB", 32)])
def test_the_chain_on_a_folder_labels_with_its_class_names(tmp_path, capsys, ray_address, port, mode, side):
    """train -> calibrate -> evaluate -> predict -> serve on a generated folder: the weights record the folder's
    class names and input size; predict agrees with evaluate's calibrated point; serve answers with the names."""
    folder = make_folder(tmp_path / "images", side=side, mode=mode)
    out = tmp_path / "run"
    size = ["--input-size", "3", str(side), str(side)] if mode == "RGB" else []
    assert run("train", "--data", folder, "--model-overrides", TINY, *size, "--epochs", "1", "--workers", "0",
               "--threads", "1", "--no-progress", "--out", out) == 0
    log = capsys.readouterr().out
    assert "batch size 8 per process, 4 steps per epoch (chosen for 36 training images" in log
    assert f"augmentation for {side} px images: pad by {side // 8} px and random crop" in log
    weights = out / "final.safetensors"
    recorded = read_canonical_metadata(weights).data_config
    assert recorded.class_names == CLASSES and recorded.input_size == (len(mode), side, side)

    assert run("calibrate", "--weights", weights, "--data", folder, "--p", "1") == 0
    calibration = capsys.readouterr().out
    assert "on 36 train images" in calibration  # the training split, never the val split unless asked
    assert run("evaluate", "--weights", weights, "--data", folder, "--out", tmp_path / "report",
               "--no-agreement") == 0
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert len(report["dvt"]["exit_accuracy"]) == 3 and len(report["dvt"]["budgets"]) == 6
    assert str(folder) in report["data"] and (tmp_path / "report" / "accuracy_vs_gflops.png").is_file()
    calibrated = report["calibrated"]

    predictions = tmp_path / "predictions.parquet"
    assert run("predict", folder / "val", "--weights", weights, "--out", predictions) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(predictions).to_pydict()
    assert set(rows["label"]) <= set(CLASSES)
    truth = [os.path.basename(os.path.dirname(p)) for p in rows["path"]]
    accuracy = 100 * np.mean([label == t for label, t in zip(rows["label"], truth)])
    assert accuracy == pytest.approx(calibrated["accuracy"], abs=1e-9)
    assert np.mean(rows["macs"]) / 1e9 == pytest.approx(calibrated["gflops"], rel=1e-6)

    pngs = sorted((folder / "val").glob("*/0.png"))
    answers, metadata, v2 = serve_answers(ray_address, weights, pngs, port)
    by_path = dict(zip(rows["path"], rows["label"]))
    assert [a["label"] for a in answers] == [by_path[str(p)] for p in pngs]
    assert metadata["parameters"]["data_config"]["class_names"] == list(CLASSES)
    assert metadata["inputs"][0]["parameters"]["datatypes"] == ["UINT8", "FP32"]
    label = next(o for o in v2["outputs"] if o["name"] == "label")
    assert label["datatype"] == "BYTES" and label["data"] == [answers[0]["label"]]


def test_the_weights_data_config_reaches_timm_and_the_export_manifest(tmp_path):
    """A model created from weights that record a data config gets it as timm's pretrained_cfg; `dvt export`
    writes it into the manifest."""
    from timm.data import resolve_data_config

    import dvt_torch

    tensors, metadata = load_canonical(SHIPPED)
    data = DataConfig((1, 28, 28), (0.5,), (0.25,), "bicubic", 0.9, class_names=tuple(f"c{k}" for k in range(10)))
    metadata.data_config = data
    path = tmp_path / "w.safetensors"
    save_canonical(path, tensors, metadata)
    model = dvt_torch.create_model("dvt_t2t_vit_fmnist", checkpoint_path=str(path))
    resolved = resolve_data_config(model=model)
    assert (resolved["mean"], resolved["std"], resolved["interpolation"], resolved["crop_pct"]) == (
        (0.5,), (0.25,), "bicubic", 0.9)
    assert model.pretrained_cfg["label_names"] == data.class_names
    assert run("export", "--weights", path, "--format", "onnx", "--out", tmp_path / "onnx") == 0
    manifest = json.loads((tmp_path / "onnx" / "dvt_onnx.json").read_text())
    assert DataConfig.from_dict(manifest["data_config"]) == data


def test_train_records_statistics_computed_from_the_folder(tmp_path, capsys):
    """--mean auto / --std auto: per-channel statistics of the training images at the model's size."""
    folder = make_folder(tmp_path / "images", mode="RGB", side=16, per_class=(4, 2))
    out = tmp_path / "run"
    assert run("train", "--data", folder, "--model-overrides", TINY, "--input-size", "3", "16", "16", "--mean", "auto",
               "--std", "auto", "--crop-pct", "1", "--interpolation", "bilinear", "--epochs", "1", "--workers", "0",
               "--batch-size", "4", "--threads", "1", "--no-progress", "--out", out) == 0
    recorded = read_canonical_metadata(out / "final.safetensors").data_config
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255
                       for p in sorted((folder / "train").glob("*/*.png"))])
    # the statistics are of the float32 pixels the model reads: each x / 255 rounded by at most 2^-24 relative
    np.testing.assert_allclose(recorded.mean, pixels.mean(axis=(0, 1, 2)), rtol=2 ** -22)
    np.testing.assert_allclose(recorded.std, pixels.std(axis=(0, 1, 2)), rtol=2 ** -20)
    assert (recorded.crop_pct, recorded.interpolation) == (1.0, "bilinear")


def test_fine_tuning_restarts_heads_of_other_classes_and_adapts_grey_to_rgb(tmp_path):
    """Heads trained on other classes start afresh; a grey model's input layers adapted to RGB compute, for a grey
    image given as RGB, what the grey model computed (tiled input weights divided by three)."""
    import torch

    from dvt_torch import build_model
    from dvt_torch.finetune import load_init_weights, read_init_weights

    init = read_init_weights(SHIPPED)
    grey = build_model(init.config).eval()
    assert load_init_weights(grey, init).reinitialised == []
    fresh = build_model(init.config)
    report = load_init_weights(fresh, init, keep_heads=False)
    assert report.reinitialised and all(".head." in key for key in report.reinitialised)
    rgb = build_model(init.config.replace(in_chans=3)).eval()
    report = load_init_weights(rgb, init)
    assert report.adapted and all("tokens_to_token.attention1" in key for key in report.adapted)
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32))
    with torch.no_grad():
        want, got = grey.forward_exits(image), rgb.forward_exits(image.expand(-1, 3, -1, -1))
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_init_weights_of_another_backend_are_read_through_the_command(tmp_path):
    """PyTorch's trainer imports no other backend: a MindSpore .ckpt reaches it through the reader `dvt train`
    passes (the backend table's), and without one it is refused with the conversion to run."""
    from dvt_cli import backends
    from dvt_torch.finetune import read_init_weights

    ckpt = tmp_path / "shipped.ckpt"
    assert run("convert", SHIPPED, ckpt) == 0
    with pytest.raises(ValueError, match=r"is a MindSpore checkpoint: `dvt train` reads it, or convert it first"):
        read_init_weights(str(ckpt))
    init = read_init_weights(str(ckpt), lambda path: backends.for_weights("ckpt").read_checkpoint(path)[0])
    shipped, _ = load_canonical(SHIPPED)
    assert set(init.tensors) == set(shipped) and init.config is None
    np.testing.assert_array_equal(init.tensors["normal_token.head.weight"], shipped["normal_token.head.weight"])


def test_defaults_fit_the_data_and_explicit_options_win():
    from argparse import ArgumentParser

    from dvt_shared.train_options import add_train_arguments, resolve_defaults

    def resolved(argv, kind="folder", size=1300, side=28, fine_tuning=False):
        args = add_train_arguments(ArgumentParser()).parse_args(argv)
        notes = resolve_defaults(args, kind, size, side, 1, fine_tuning, cpus=2)
        return args, notes

    args, notes = resolved([])
    assert (args.batch_size, args.lr, args.warmup_epochs, args.crop_padding, args.workers) == (32, 1e-3, 1.0, 3, 2)
    assert args.scale is None and any("pad by 3 px" in n for n in notes)
    args, _ = resolved(["--batch-size", "64", "--lr", "0.01", "--warmup-epochs", "3"], fine_tuning=True)
    assert (args.batch_size, args.lr, args.warmup_epochs) == (64, 0.01, 3.0)
    args, _ = resolved([], fine_tuning=True)
    assert (args.lr, args.warmup_epochs) == (5e-4, 0.2)
    args, notes = resolved([], side=224, size=1_281_167)
    assert args.batch_size == 128 and args.scale == (0.08, 1.0) and args.color_jitter == 0.4
    assert any("random resized crop" in n for n in notes)
    args, notes = resolved(["--scale", "0.8", "1"], side=28)
    assert args.scale == (0.8, 1.0) and any("random resized crop" in n for n in notes)
    args, _ = resolved([], kind="fmnist", size=60000)
    assert (args.batch_size, args.crop_padding) == (128, 2)


def test_one_class_an_empty_class_and_different_class_folders_are_refused(tmp_path):
    one = make_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match="has only the class 'only': a classifier needs two classes or more"):
        open_data(str(one))
    empty = make_folder(tmp_path / "empty")
    (empty / "train" / "void").mkdir()
    (empty / "val" / "void").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['void'\] hold no images"):
        open_data(str(empty))
    differ = make_folder(tmp_path / "differ")
    (differ / "val" / "stripes").rename(differ / "val" / "zigzag")
    with pytest.raises(DataError, match=r"train/ has \['circle', 'cross', 'stripes'\], val/ has "
                                        r"\['circle', 'cross', 'zigzag'\]"):
        open_data(str(differ))
    with pytest.raises(DataError, match="pass --val-split F"):
        open_data(str(differ / "train"))
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("L", (4, 4)).save(loose / "a.png")
    with pytest.raises(DataError, match="holds images but no class folders"):
        open_data(str(loose))


def test_unreadable_images_are_skipped_with_a_count_and_the_first_named(tmp_path):
    folder = make_folder(tmp_path / "images")
    (folder / "val" / "cross" / "broken.png").write_bytes(b"not a png")
    (folder / "val" / "cross" / "empty.png").write_bytes(b"")
    dataset = open_data(str(folder))
    data = default_data_config(_config(3))
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 14 \(first: .*broken.png: cannot read"):
        images, labels = load_split(dataset.val, data, "val")
    assert images.shape == (12, 1, 28, 28) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for path in (folder / "val").glob("*/*.png"):
        path.write_bytes(b"junk")
    with pytest.raises(DataError, match="none of its 14 images can be read"):
        load_split(dataset.val, data, "val")


def test_grey_and_rgb_mixed_are_converted_and_said_once(tmp_path):
    folder = make_folder(tmp_path / "images")
    for path in list((folder / "train" / "circle").glob("*.png"))[:3]:
        Image.open(path).convert("RGB").save(path)
    dataset = open_data(str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _ = load_split(dataset.train, default_data_config(_config(3)), "train")
    said = [str(w.message) for w in caught if "converted" in str(w.message)]
    assert said == ["train: 3 of 36 images are RGB; converted to the model's 1 channel(s) (grey)"]
    assert images.shape == (36, 1, 28, 28)


def test_weights_and_data_with_other_classes_are_refused(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")
    err = fails(capsys, "calibrate", "--weights", SHIPPED, "--data", folder, "--out", tmp_path / "c.safetensors")
    assert "was trained on the classes ['T-shirt/top'" in err and "holds ['circle', 'cross', 'stripes']" in err
    dataset = open_data(str(folder))
    with pytest.raises(DataError, match=r"has 10 classes; .* holds 3"):
        check_classes(dataset, default_data_config(_config(10)).replace(class_names=None), 10, "w")


def test_parquet_data_sets_and_a_missing_label_column(tmp_path, capsys):
    """Parquet files of encoded images with a label column (names or indices) are a data set like a folder; one
    without the label column is refused, naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = make_folder(tmp_path / "images")
    for split in ("train", "val"):
        (tmp_path / "pq" / split).mkdir(parents=True)
        paths = sorted((folder / split).glob("*/*.png"))
        table = pa.table({"image": [p.read_bytes() for p in paths], "label": [p.parent.name for p in paths]})
        pq.write_table(table, tmp_path / "pq" / split / "part.parquet")
    from_parquet, from_folder = open_data(str(tmp_path / "pq")), open_data(str(folder))
    assert from_parquet.kind == "parquet" and from_parquet.classes == from_folder.classes
    data = default_data_config(_config(3))
    np.testing.assert_array_equal(load_split(from_parquet.val, data, "v")[0], load_split(from_folder.val, data, "v")[0])
    np.testing.assert_array_equal(from_parquet.val.labels, from_folder.val.labels)
    # labels given as class indices alone: the model's classes by index, whatever it names them
    indexed = tmp_path / "indexed.parquet"
    paths = sorted((folder / "val").glob("*/*.png"))
    pq.write_table(pa.table({"image": [p.read_bytes() for p in paths],
                             "label": [CLASSES.index(p.parent.name) for p in paths]}), indexed)
    assert run("evaluate", "--weights", SHIPPED, "--data", indexed, "--val-split", "0.5", "--no-agreement",
               "--out", tmp_path / "indexed") == 0
    assert str(indexed) in json.loads((tmp_path / "indexed" / "evaluation.json").read_text())["data"]
    with pytest.raises(DataError, match="has 2 classes; the class indices of .* run to 2"):
        check_classes(open_data(str(indexed), 0.5), default_data_config(_config(2)), 2, "w")
    unlabelled = tmp_path / "unlabelled.parquet"
    pq.write_table(pa.table({"image": [b"x"], "class": [0]}), unlabelled)
    err = fails(capsys, "calibrate", "--weights", SHIPPED, "--data", unlabelled, "--val-split", "0.5")
    assert "has no label column 'label' (its columns: image, class); name it with --label-column" in err
    err = fails(capsys, "evaluate", "--weights", SHIPPED, "--data", unlabelled, "--val-split", "0.5",
                "--out", tmp_path / "r")
    assert "has no label column 'label'" in err


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--weights", SHIPPED, "--data-d", "/nowhere"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --data-d" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--weigh", SHIPPED])


def test_weights_without_a_data_config_fall_back_with_one_warning(tmp_path):
    from dvt_shared.data_config import weights_data_config

    tensors, metadata = load_canonical(SHIPPED)
    metadata.data_config = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = weights_data_config(metadata.config, metadata, str(tmp_path / "old.safetensors"))
        weights_data_config(metadata.config, metadata, str(tmp_path / "old.safetensors"))
    assert len(caught) == 1 and "records no data config" in str(caught[0].message)
    assert first.class_names == FASHION_MNIST_CLASSES
    rgb = metadata.config.replace(in_chans=3, num_classes=10)
    assert default_data_config(rgb).class_names is None and default_data_config(rgb).mean == (0.485, 0.456, 0.406)


def _config(num_classes: int):
    from dvt_shared.models import get_model_config

    return get_model_config("dvt_t2t_vit_fmnist", num_classes=num_classes)
