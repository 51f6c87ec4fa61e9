"""Training loop: augmentation, sharding, learning, exact resume, torchrun, static baseline.

Runs use a tiny config override on a small synthetic Fashion-MNIST-shaped dataset whose
classes are learnable (a bright bar whose row is the class), so the tests need neither
the real data set nor more than a few seconds each. One torch thread: on a shared
2-core machine, spinning OpenMP threads make tiny models many times slower.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dvt_shared.configs import static_baseline
from dvt_shared.datasets import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_FILES, normalise_fashion_mnist, write_idx
from dvt_shared.flops import exit_gflops
from dvt_shared.models import get_model_config
from dvt_shared.weight_format import load_canonical
from dvt_torch import train as train_module
from dvt_torch.data import (
    BatchAugment,
    epoch_indices,
    random_crop,
    random_erase,
    seeded_subset,
)
from dvt_torch.dvt import DVT
from dvt_torch.train import Dist, TrainingRun, add_train_arguments, train
from dvt_torch.train_outputs import history_figure
from dvt_torch.train_state import load_checkpoint

TINY = json.dumps({"embed_dim": 16, "depth": 1, "num_heads": 2, "token_dim": 8, "reuse_dim": 8, "reuse_hidden": 16})
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic_split(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 3 + 2 * label:5 + 2 * label, 4:24] = 250
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    for split, n, seed in (("train", 256, 0), ("test", 100, 1)):
        images, labels = _synthetic_split(n, seed)
        write_idx(root / (FASHION_MNIST_FILES[f"{split}_images"] + ".gz"), images)
        write_idx(root / FASHION_MNIST_FILES[f"{split}_labels"], labels)
    return str(root)


def _args_list(out, data_dir, *extra):
    return [
        "--data-dir", data_dir, "--model-overrides", TINY, "--batch-size", "16", "--epochs", "2",
        "--threads", "1", "--no-progress", "--out", str(out), *extra,
    ]


def _args(out, data_dir, *extra):
    return add_train_arguments(argparse.ArgumentParser()).parse_args(_args_list(out, data_dir, *extra))


def _weights(path):
    return load_canonical(path)[0]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------- data pieces


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    generator = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, -1.0, generator)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for b in range(2):
        windows = [padded[b, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    assert torch.equal(random_crop(x, 0, -1.0, generator), x)


def test_augmentation_replays_from_generator_state():
    x = torch.from_numpy(normalise_fashion_mnist(np.random.default_rng(0).integers(0, 256, (8, 28, 28), np.uint8)))
    augment = BatchAugment(erase_prob=0.5)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    first = augment(x, generator)
    generator.set_state(state)
    assert torch.equal(augment(x, generator), first)
    assert not torch.equal(first, x)


def test_random_erase_blanks_one_rectangle():
    x = torch.ones(64, 1, 28, 28)
    out = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    for image in out[:, 0]:
        rows, cols = torch.nonzero(image == 0, as_tuple=True)
        assert len(rows) > 0
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert len(rows) == height * width  # a full rectangle, nothing else
    assert torch.equal(random_erase(x, 0.0, torch.Generator()), x)


def test_epoch_indices_shard_disjointly_and_reshuffle():
    shards = [epoch_indices(103, 0, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(epoch_indices(103, 0, seed=5, rank=1, world_size=2), shards[1])
    assert not torch.equal(epoch_indices(103, 1, seed=5), epoch_indices(103, 0, seed=5))
    assert seeded_subset(10, None, 0) is None and len(seeded_subset(10, 4, 0)) == 4


# ------------------------------------------------------------- training runs


def test_tiny_run_learns_and_writes_its_files(tmp_path, data_dir):
    out = tmp_path / "run"
    # Bars two rows apart: a shifting crop would blur the classes this tiny model can tell apart.
    metrics = train(_args(out, data_dir, "--epochs", "4", "--lr", "1e-2", "--warmup-epochs", "0.5",
                          "--crop-padding", "0"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert {"epoch", "step", "loss", "train_acc", "test_acc", "lr", "epoch_time_s", "elapsed_s",
            "train_images_per_s"} <= set(log[0])
    assert all(r["train_images_per_s"] > 0 for r in log)
    assert len(log[0]["train_acc"]) == len(log[0]["test_acc"]) == 3
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert max(log[-1]["test_acc"]) > 15.0  # chance is 10%
    assert metrics["completed"] and metrics["steps"] == 4 * 16 and metrics["test_acc"] == log[-1]["test_acc"]

    tensors, metadata = load_canonical(out / "final.safetensors")
    config = get_model_config("dvt_t2t_vit_fmnist", num_classes=10, **json.loads(TINY))
    assert metadata.config == config
    assert metadata.exit_flops == pytest.approx(list(exit_gflops(config)))
    assert json.loads(metadata.extra["test_acc"]) == log[-1]["test_acc"]
    assert json.loads(metadata.provenance)["args"]["lr"] == 1e-2
    model = DVT(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)

    checkpoint = load_checkpoint(str(out / "last.pt"))  # weights_only=True inside
    assert checkpoint["epoch"] == 4 and checkpoint["step"] == 64
    torch.load(out / "last.pt", weights_only=True)

    from PIL import Image

    with Image.open(out / "log.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    # The plot's curves: one point per epoch, each exit's test accuracy and the loss as logged.
    fig = history_figure(log)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert {f"exit {k} test" for k in range(3)} | {"training loss"} <= set(lines)
    for k in range(3):
        assert list(lines[f"exit {k} test"].get_xdata()) == [1, 2, 3, 4]
        assert list(lines[f"exit {k} test"].get_ydata()) == [r["test_acc"][k] for r in log]
    assert list(lines["training loss"].get_ydata()) == [r["loss"] for r in log]


def test_plot_is_rewritten_every_epoch(tmp_path, data_dir):
    out = tmp_path / "run"
    train(_args(out, data_dir, "--epochs", "2", "--max-steps", "16"))
    first = (out / "log.png").read_bytes()
    train(_args(out, data_dir, "--epochs", "2", "--resume"))
    assert (out / "log.png").read_bytes() != first


# every random source at once: dropout, crop/flip/erase, mixup/cutmix, EMA, clipping
RESUME_RECIPE = ("--random-erase", "0.5", "--mixup", "0.4", "--cutmix", "1.0", "--ema", "--ema-decay", "0.9",
                 "--clip-grad", "1.0", "--train-subset", "200", "--seed", "3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The run every interrupted one must reproduce: 2 epochs of 12 steps."""
    out = tmp_path_factory.mktemp("whole")
    train(_args(out, data_dir, *RESUME_RECIPE))
    return out


def _assert_same_run(whole, split):
    for name in ("final.safetensors", "final_ema.safetensors"):
        _assert_same_weights(_weights(whole / name), _weights(split / name))
    whole_log = [json.loads(x) for x in (whole / "log.jsonl").read_text().splitlines()]
    split_log = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("epoch_time_s", "elapsed_s", "train_images_per_s")}  # noqa: E731
    assert [strip(r) for r in whole_log] == [strip(r) for r in split_log]


@pytest.mark.parametrize(
    "stop_at", [12, 17, random.Random().randrange(1, 24)], ids=["epoch-boundary", "mid-epoch", "random-step"]
)
def test_resume_is_bit_identical(tmp_path, data_dir, uninterrupted, stop_at):
    print(f"interrupted after step {stop_at}")
    partial = train(_args(tmp_path, data_dir, *RESUME_RECIPE, "--max-steps", str(stop_at)))
    assert not partial["completed"] and partial["steps"] == stop_at
    assert not (tmp_path / "final.safetensors").exists()
    resumed = train(_args(tmp_path, data_dir, *RESUME_RECIPE, "--resume"))
    assert resumed["completed"] and resumed["steps"] == 24
    _assert_same_run(uninterrupted, tmp_path)


def test_resume_after_sigkill_is_bit_identical(tmp_path, data_dir):
    """A real training process killed with SIGKILL at a random moment after its first
    checkpoint (mid-step, mid-evaluation or mid-write of last.pt alike), then resumed,
    ends with the uninterrupted run's weights and log."""
    recipe = (*RESUME_RECIPE, "--epochs", "4")
    train(_args(tmp_path / "whole", data_dir, *recipe))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dvt_torch.train", *map(str, _args_list(out, data_dir, *recipe))]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=sink)
    try:
        started = time.monotonic()
        while not (out / "last.pt").exists():
            assert process.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() - started < 120, "no checkpoint after 2 minutes"
            time.sleep(0.01)
        # anywhere in the second and third of four epochs, each about as long as the first
        epoch_s = json.loads((out / "log.jsonl").read_text().splitlines()[0])["epoch_time_s"]
        # a generator of its own: pytest plugins may seed the global one
        delay = random.Random().uniform(0.0, 2 * epoch_s)
        print(f"killed {delay:.2f} s after the first checkpoint (epochs take {epoch_s} s)")
        time.sleep(delay)
    finally:
        process.kill()
        process.wait()
    assert not (out / "final.safetensors").exists(), "the run finished before it could be killed"
    resumed = train(_args(out, data_dir, *recipe, "--resume"))
    assert resumed["completed"] and resumed["steps"] == 48
    _assert_same_run(tmp_path / "whole", out)


def test_resume_refuses_a_changed_recipe(tmp_path, data_dir):
    train(_args(tmp_path, data_dir, "--max-steps", "2"))
    with pytest.raises(ValueError, match=r"recipe differs .*lr: 0.001 -> 0.002"):
        train(_args(tmp_path, data_dir, "--resume", "--lr", "2e-3"))
    with pytest.raises(ValueError, match="already holds a run"):
        train(_args(tmp_path, data_dir))


def test_gradient_accumulation_gives_the_whole_batch_gradient(tmp_path, data_dir):
    """--grad-accum 4: the batch as four micro-batches adds up to the whole batch's gradient (to the fp32 bound),
    with --channels-last as well."""
    from dvt_shared.error_bounds import computation_blocks
    from tests.bounds import assert_close

    overrides = json.dumps({**json.loads(TINY), "stem_drop_rate": 0.0})
    gradients, sums = [], []
    # the micro-batches run in channels-last layout too: the layout changes no gradient either
    for extra in (("--grad-accum", "1"), ("--grad-accum", "4", "--channels-last")):
        run = _tiny_run(data_dir, tmp_path / extra[1], "--model-overrides", overrides, *extra)
        step = run.apply_gradients

        def capture(run=run, step=step):
            gradients.append(torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None]))
            step()

        run.apply_gradients = capture
        run.train_step(*next(run.data.train_batches(0, 0, run.augment_generator)))
        sums.append({k: v.clone() for k, v in run.sums.items()})
    blocks = 2 * computation_blocks(run.config)
    assert_close(gradients[1].numpy(), gradients[0].numpy(), blocks, label="accumulated gradient")
    assert int(sums[1]["seen"]) == int(sums[0]["seen"]) == 16
    with pytest.raises(ValueError, match="--grad-accum 3 must be a positive divisor of --batch-size 16"):
        _tiny_run(data_dir, tmp_path / "bad", "--grad-accum", "3")


def test_resume_may_extend_the_epochs(tmp_path, data_dir):
    """A finished run continued with a larger --epochs trains the extra epochs on top of it (the cosine
    schedule stretched to the new length, as timm's train.py resumes)."""
    first = train(_args(tmp_path, data_dir))
    assert first["completed"] and first["steps"] == 32  # 2 epochs of 256 / 16
    before = _weights(tmp_path / "final.safetensors")
    more = train(_args(tmp_path, data_dir, "--resume", "--epochs", "3"))
    assert more["completed"] and more["steps"] == 48
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    after = _weights(tmp_path / "final.safetensors")
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_bad_options_are_refused(tmp_path, data_dir, monkeypatch):
    with pytest.raises(FileNotFoundError):
        train(_args(tmp_path / "t", data_dir, "--teacher", str(tmp_path / "no_teacher.safetensors")))
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="--amp bf16 on CPU needs native bf16"):
        train(_args(tmp_path / "f", data_dir, "--amp", "bf16", "--device", "cpu"))
    with pytest.raises(ValueError, match="--exit-weights has 2 values but .* has 3 exits"):
        train(_args(tmp_path / "b", data_dir, "--exit-weights", "1", "2"))
    with pytest.raises(ValueError, match="do not fill one batch"):
        train(_args(tmp_path / "c", data_dir, "--train-subset", "8"))
    with pytest.raises(ValueError, match="unknown config field"):
        train(_args(tmp_path / "d", data_dir, "--model-overrides", '{"width": 3}'))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train(_args(tmp_path / "e", str(tmp_path / "nowhere")))


def test_static_baseline_config_and_training(tmp_path, data_dir):
    base = get_model_config("dvt_t2t_vit_fmnist")
    static = get_model_config("dvt_t2t_vit_fmnist_static")
    assert static == static_baseline(base)
    assert static.name == "dvt_t2t_vit_fmnist_static" and static.num_exits == 1 and static.reuse == "none"
    assert static.stages == (base.stages[-1],) and static.grids == (base.grids[-1],)
    assert (static.embed_dim, static.depth, static.num_heads) == (base.embed_dim, base.depth, base.num_heads)
    assert exit_gflops(static)[0] < exit_gflops(base)[-1]
    model = DVT(static)
    assert len(model.forward_exits(torch.zeros(2, 1, 28, 28))) == 1
    assert not any("reuse" in key for key in model.state_dict())

    metrics = train(_args(tmp_path, data_dir, "--model", "dvt_t2t_vit_fmnist_static", "--epochs", "1"))
    assert len(metrics["test_acc"]) == 1
    assert load_canonical(tmp_path / "final.safetensors")[1].config.num_exits == 1


def test_image_folder_run(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / "images" / split / cls)
            for i in range(8):
                pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / cls / f"{i}.jpg")
    overrides = json.dumps({**json.loads(TINY), "in_chans": 3})
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--data", str(tmp_path / "images"), "--model-overrides", overrides, "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run"),
    ])
    metrics = train(args)
    assert metrics["completed"] and metrics["steps"] == 4
    metadata = load_canonical(tmp_path / "run" / "final.safetensors")[1]
    assert metadata.config.num_classes == 2 and metadata.config.in_chans == 3


def test_grey_image_folder_feeds_a_one_channel_model(tmp_path, data_dir):
    """A folder of 28x28 grey PNGs trains the Fashion-MNIST DVT: images are read as grey and normalised
    with the model's own statistics (its pretrained_cfg), not as RGB with ImageNet's."""
    from PIL import Image

    from dvt_shared.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    run = _tiny_run(data_dir, tmp_path / "run", "--data", str(_grey_folder(tmp_path / "grey")), "--workers", "0")
    assert run.config.in_chans == 1 and run.config.num_classes == 2
    image, _ = run.data.test_set[0]
    assert tuple(image.shape) == (1, 28, 28)
    path = run.data.test_split.refs[0].path
    expected = (np.asarray(Image.open(path), dtype=np.float32) / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(image[0].numpy(), expected, rtol=0, atol=1e-6)
    batch, _ = next(run.data.train_batches(0, 0, run.augment_generator))
    assert tuple(batch.shape) == (16, 1, 28, 28)
    run.train_step(*next(run.data.train_batches(0, 0, run.augment_generator)))
    assert run.step == 1


def _grey_folder(root, classes: int = 2, count: int = 32, splits=("train", "val")):
    """28x28 grey PNGs in root/SPLIT/CLASS for each of `splits` (no splits: root/CLASS)."""
    from PIL import Image

    images, labels = _synthetic_split(count, 3)
    for split in splits or ("",):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class{label % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{i}.png")
    return root


RELEASE_AUGMENTATION = ("--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "pixel",
                        "--train-interpolation", "random", "--mixup", "0.8", "--cutmix", "1.0")


def test_one_folder_split_by_val_split_trains_with_the_release_augmentation(tmp_path, data_dir):
    """--val-split holds out that share of every class (disjoint, drawn from --seed); timm's RandAugment, pixel
    random erasing, random interpolation and mixup/cutmix run on grey images; best.safetensors is kept."""
    folder = _grey_folder(tmp_path / "flat", count=40, splits=())
    out = tmp_path / "run"
    metrics = train(_args(out, data_dir, "--data", str(folder), "--val-split", "0.25", "--workers", "0",
                          "--epochs", "1", *RELEASE_AUGMENTATION))
    assert metrics["completed"] and np.isfinite(metrics["train_loss"])
    run = _tiny_run(data_dir, tmp_path / "again", "--data", str(folder), "--val-split", "0.25", "--workers", "0")
    train_split, val_split = run.data.train_split, run.data.test_split
    train_paths, val_paths = {r.path for r in train_split.refs}, {r.path for r in val_split.refs}
    assert not train_paths & val_paths and len(train_paths) + len(val_paths) == 40
    labels = np.concatenate([train_split.labels, val_split.labels])
    for label in range(2):
        members = int((labels == label).sum())
        assert int((val_split.labels == label).sum()) == round(0.25 * members)  # stratified
    best = load_canonical(out / "best.safetensors")[1]
    assert json.loads(best.extra["best"])["epoch"] == 1
    with pytest.raises(ValueError, match="drop --val-split"):
        _tiny_run(data_dir, tmp_path / "x", "--data", str(_grey_folder(tmp_path / "split")), "--val-split", "0.5")


def test_folder_augmentation_is_the_same_on_any_worker_and_replays(tmp_path, data_dir):
    """Each image's random draws are seeded by (seed, epoch, image): two loader workers give the batches that
    the main process gives, an epoch read again gives the same batches, the next epoch other ones."""
    folder = str(_grey_folder(tmp_path / "grey"))

    def first_batch(workers, epoch):
        run = _tiny_run(data_dir, tmp_path / f"w{workers}", "--data", folder, "--workers", str(workers),
                        *RELEASE_AUGMENTATION[:8])
        return next(run.data.train_batches(epoch, 0, run.augment_generator))[0]

    main_process = first_batch(0, 0)
    torch.testing.assert_close(first_batch(2, 0), main_process, rtol=0, atol=0)
    torch.testing.assert_close(first_batch(0, 0), main_process, rtol=0, atol=0)
    assert not torch.equal(first_batch(0, 1), main_process)


def test_cooldown_epochs_run_at_the_minimum_rate_and_the_best_weights_are_kept(tmp_path, data_dir):
    out = tmp_path / "run"
    metrics = train(_args(out, data_dir, "--epochs", "1", "--cooldown-epochs", "1", "--ema", "--ema-decay", "0.5",
                          "--min-lr", "1e-5", "--drop-path", "0.2"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[1]["lr"] == pytest.approx(1e-5)
    best = metrics["best"]
    accuracy, source, epoch = best["test_acc_last_exit"], best["weights"], best["epoch"]
    record = log[epoch - 1]
    assert accuracy == record["test_acc" if source == "model" else "test_acc_ema"][-1]
    assert accuracy == max(max(r["test_acc"][-1], r["test_acc_ema"][-1]) for r in log)
    tensors, metadata = load_canonical(out / "best.safetensors")
    assert metadata.config.drop_path_rate == 0.2
    if epoch == 2:  # the last epoch's weights: the final file of the same source
        final = _weights(out / ("final.safetensors" if source == "model" else "final_ema.safetensors"))
        _assert_same_weights(tensors, final)


def test_best_so_far_takes_the_earliest_best_of_model_and_ema():
    from dvt_torch.train_outputs import best_so_far

    history = [{"epoch": 1, "test_acc": [10.0, 50.0], "test_acc_ema": [10.0, 40.0]},
               {"epoch": 2, "test_acc": [10.0, 45.0], "test_acc_ema": [10.0, 60.0]},
               {"epoch": 3, "test_acc": [10.0, 60.0], "test_acc_ema": [10.0, 20.0]}]
    assert best_so_far(history) == (60.0, "ema", 2)
    assert best_so_far(history[:1]) == (50.0, "model", 1)


def test_synthetic_data_trains_through_torch_compile(tmp_path, data_dir):
    """--compile: the training forward runs through torch.compile (backend eager here: dynamo captures the forward,
    without code generation) and learns what the uncompiled model learns."""
    common = ("--data", "synthetic", "--train-subset", "64", "--test-subset", "32", "--epochs", "1", "--drop-path", "0")
    eager = train(_args(tmp_path / "eager", data_dir, *common))
    compiled = train(_args(tmp_path / "compiled", data_dir, *common, "--compile", "--compile-backend", "eager"))
    assert compiled["completed"] and compiled["steps"] == 4
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)


def test_fine_tuning_loads_all_but_the_heads(tmp_path, data_dir, capsys):
    """--init-weights: a 10-class Fashion-MNIST run's weights start a 2-class image-folder run; everything
    but the heads is loaded, the first stage can stay frozen, the heads can learn faster."""
    pretrained = train(_args(tmp_path / "pre", data_dir, "--epochs", "1"))
    assert pretrained["completed"]
    source = tmp_path / "pre" / "final.safetensors"
    folder = _grey_folder(tmp_path / "grey")
    run = _tiny_run(data_dir, tmp_path / "ft", "--data", str(folder), "--workers", "0", "--init-weights", str(source),
                    "--freeze-stages", "1", "--head-lr-scale", "10")
    assert run.config.num_classes == 2
    report = run.init_report
    heads = {f"{stage}.head.{p}" for stage in ("less_less_token", "less_token", "normal_token")
             for p in ("weight", "bias")}
    assert set(report.reinitialised) == heads and not report.interpolated and not report.ignored
    stored = _weights(source)
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert all(np.array_equal(state[k].numpy(), stored[k]) for k in report.loaded) and len(report.loaded) > 50
    assert {g["lr_scale"] for g in run.optimizer.param_groups} == {1.0, 10.0}
    frozen = {k: v.clone() for k, v in run.model.less_less_token.state_dict().items()}
    run.train_step(*next(run.data.train_batches(0, 0, run.augment_generator)))
    assert all(torch.equal(frozen[k], v) for k, v in run.model.less_less_token.state_dict().items())
    assert not torch.equal(state["normal_token.head.weight"], run.model.state_dict()["normal_token.head.weight"])


def test_fine_tuning_interpolates_learned_positions_and_reads_release_files(tmp_path):
    from dvt_torch.checkpoint import write_release_checkpoint
    from dvt_torch.convert import to_canonical
    from dvt_torch.finetune import load_init_weights, read_init_weights

    small = get_model_config("dvt_deit_small", img_size=64, embed_dim=24, depth=1, num_heads=2, num_classes=7)
    torch.manual_seed(0)
    path = tmp_path / "deit.pth"
    write_release_checkpoint(path, to_canonical(DVT(small)))
    init = read_init_weights(str(path))
    assert init.config is None  # a release file: the model comes from --model
    larger = DVT(small.replace(img_size=96, num_classes=3))
    report = load_init_weights(larger, init)
    assert report.interpolated == [f"{s}.pos_embed" for s in ("less_less_token", "less_token", "normal_token")]
    assert len(report.reinitialised) == 6
    with pytest.raises(ValueError, match="only the heads, learned position embeddings and a grey model's input layers"):
        load_init_weights(DVT(small.replace(embed_dim=32, num_heads=2)), init)
    with pytest.raises(ValueError, match="is a directory"):
        read_init_weights(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_smoke(tmp_path):
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--model-overrides", TINY, "--train-subset", "64", "--test-subset", "50", "--batch-size", "32", "--epochs", "1",
        "--threads", "1", "--no-progress", "--out", str(tmp_path),
    ])
    metrics = train(args)
    assert metrics["steps"] == 2 and len(metrics["test_acc"]) == 3


@pytest.mark.parametrize("flag", ["--local-rank=1", "--local_rank=1"])
def test_the_local_rank_flag_of_torch_distributed_launch_is_taken(flag, data_dir, tmp_path, monkeypatch):
    """torch.distributed.launch passes --local-rank (older versions --local_rank) instead of LOCAL_RANK."""
    args = _args(tmp_path, data_dir, flag, "--device", "cpu")
    assert args.local_rank == 1
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_module.setup_distributed("cpu", args.local_rank).local_rank == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train_module.setup_distributed("cpu", args.local_rank).local_rank == 0  # torchrun's variable wins


@pytest.mark.slow
def test_torchrun_two_ranks_agree(tmp_path, data_dir):
    """torchrun --standalone, 2 ranks on one node, with augmentation (make test runs the two-node case below)."""
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dvt_torch.train", "--data-dir", data_dir, "--model-overrides", TINY, "--batch-size", "16",
        "--epochs", "2", "--train-subset", "128", "--threads", "1", "--no-progress", "--out", str(out),
        "--dump-rank-weights", "--random-erase", "0.25",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8]  # 128 samples / 2 ranks / 16 per batch
    rank0, rank1 = _weights(out / "final.safetensors"), _weights(out / "final.rank1.safetensors")
    _assert_same_weights(rank0, rank1)
    initial = DVT(get_model_config("dvt_t2t_vit_fmnist", num_classes=10, **json.loads(TINY))).state_dict()
    assert any(not np.array_equal(rank0[k], initial[k].numpy()) for k in rank0)
    assert len(load_checkpoint(str(out / "last.pt"))["ranks"]) == 2


def test_two_nodes_through_c10d_rendezvous_train_as_one_process(tmp_path, data_dir):
    """torchrun on 2 nodes x 1 process (two launchers meeting through a c10d rendezvous on localhost, gloo):
    with the same seed, no dropout and no augmentation, 2 ranks x 16 images per step train as one process
    with 32: the logged loss agrees to the fp32 bound, and so do the weights, to a bound of AdamW's making."""
    import socket

    from dvt_shared.error_bounds import FP32, computation_blocks

    overrides = json.dumps({**json.loads(TINY), "stem_drop_rate": 0.0})
    recipe = ["--model-overrides", overrides, "--train-subset", "128", "--epochs", "1", "--crop-padding", "0",
              "--no-flip", "--warmup-epochs", "0", "--label-smoothing", "0"]
    single = train(_args(tmp_path / "single", data_dir, *recipe, "--batch-size", "32"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "nodes"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "dvt-test",
                "-m", "dvt_torch.train", *_args_list(out, data_dir, *recipe), "--dump-rank-weights"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(launcher, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=170)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    assert single["steps"] == 4 and json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert len(load_checkpoint(str(out / "last.pt"))["ranks"]) == 2  # each rank's RNG state, for resuming
    one, two = _weights(tmp_path / "single" / "final.safetensors"), _weights(out / "final.safetensors")
    _assert_same_weights(two, _weights(out / "final.rank1.safetensors"))
    config = get_model_config("dvt_t2t_vit_fmnist", num_classes=10, **json.loads(overrides))
    losses = [json.loads((folder / "log.jsonl").read_text().splitlines()[-1])["loss"]
              for folder in (tmp_path / "single", out)]
    loss_bound = FP32.bound(computation_blocks(config), losses[0]) + 1e-6  # + the log's 6-decimal rounding
    print(f"2 nodes against 1 process: loss {losses[1]} against {losses[0]} (bound {loss_bound:.1e})")
    assert abs(losses[1] - losses[0]) <= loss_bound
    # AdamW divides each gradient by its root mean square (+ eps 1e-8): where a gradient is near zero, a
    # rounding-sized difference (the ranks' mean is summed in another order) moves that weight by up to
    # lr x difference / eps, while training on other data would move every weight by about lr per step.
    torch.manual_seed(0)
    initial = DVT(config).state_dict()
    moved = max(float(np.abs(one[k] - initial[k].numpy()).max()) for k in one)
    delta = max(float(np.abs(one[k] - two[k]).max()) for k in one)
    print(f"max |d weight| {delta:.2e}, largest move {moved:.2e}")
    assert moved > 1e-3 and delta <= 1e-2 * moved


def test_dvt_train_command(tmp_path, data_dir):
    from dvt_cli import main

    argv = ["train", "--data-dir", data_dir, "--model-overrides", TINY, "--batch-size", "16", "--epochs", "1",
            "--train-subset", "32", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert main(argv + ["--max-steps", "1"]) == 1  # refuses to overwrite the finished run
    recipe = json.loads(load_canonical(tmp_path / "final.safetensors")[1].provenance)
    assert "handler" not in recipe["args"] and recipe["args"]["train_subset"] == 32


def _tiny_run(data_dir, tmp_path, *extra):
    args = _args(tmp_path, data_dir, *extra)
    return TrainingRun(args, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


@pytest.mark.skipif(not train_module.cpu_has_native_bf16(),
                    reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
def test_amp_bf16_on_a_cpu_with_native_bf16(tmp_path, data_dir):
    run = _tiny_run(data_dir, tmp_path, "--amp", "bf16", "--device", "cpu")
    images, labels = next(run.data.train_batches(0, 0, run.augment_generator))
    outputs = run.forward(images)
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.train_step(images, labels)
    assert run.step == 1
    assert all(v.dtype == torch.float32 for v in run.model.state_dict().values())  # weights stay float32
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())


def test_amp_fp16_trains_without_overflow(tmp_path, data_dir):
    """fp16 autocast with loss scaling (as on CUDA, here through the CPU's fp16 autocast): the T2T
    performer computes in float32, so logits and loss stay finite, and the loss falls."""
    run = _tiny_run(data_dir, tmp_path, "--amp", "fp16", "--device", "cpu", "--lr", "2e-3", "--warmup-epochs", "0")
    assert run.scaler is not None
    images, labels = next(run.data.train_batches(0, 0, run.augment_generator))

    def loss() -> float:
        with torch.no_grad():
            return float(run.loss(run.forward(images), labels, images))

    outputs = run.forward(images)
    assert all(o.dtype == torch.float16 and torch.isfinite(o).all() for o in outputs)
    before = loss()
    for _ in range(8):
        run.train_step(images, labels)
    after = loss()
    assert np.isfinite(before) and np.isfinite(after) and after < before, (before, after)
    assert run.scaler.get_scale() > 1  # scaled, and no step was skipped down to nothing
    assert all(v.dtype == torch.float32 for v in run.model.state_dict().values())


SHIPPED_TEACHER = os.path.join(REPO, "weights", "resnet_fmnist.safetensors")


def test_distillation_loss_is_the_mean_of_label_and_teacher_losses(tmp_path, data_dir):
    plain = _tiny_run(data_dir, tmp_path / "plain", "--label-smoothing", "0.1")
    taught = _tiny_run(data_dir, tmp_path / "taught", "--label-smoothing", "0.1", "--teacher", SHIPPED_TEACHER)
    assert not any(p.requires_grad for p in taught.teacher.parameters()) and not taught.teacher.training
    images, labels = next(taught.data.train_batches(0, 0, taught.augment_generator))
    outputs = taught.forward(images)
    with torch.no_grad():
        teacher_labels = taught.teacher(images).argmax(dim=1)
    assert not torch.equal(teacher_labels, labels)  # else the check below could not tell the two losses apart
    expected = (
        sum(torch.nn.functional.cross_entropy(o, labels, label_smoothing=0.1) for o in outputs)
        + sum(torch.nn.functional.cross_entropy(o, teacher_labels) for o in outputs)
    ) / 2
    torch.testing.assert_close(taught.loss(outputs, labels, images), expected)
    label_loss = sum(torch.nn.functional.cross_entropy(o, labels, label_smoothing=0.1) for o in outputs)
    torch.testing.assert_close(plain.loss(outputs, labels, images), label_loss)
    metrics = train(_args(tmp_path / "run", data_dir, "--teacher", SHIPPED_TEACHER, "--max-steps", "3"))
    assert metrics["steps"] == 3
    with pytest.raises(ValueError, match="--teacher .* 5 classes"):
        five_classes = get_model_config("dvt_t2t_vit_fmnist", num_classes=5)
        train_module.load_teacher(SHIPPED_TEACHER, five_classes, torch.device("cpu"))


@pytest.mark.slow
def test_the_device_check_runs_on_a_cpu():
    """benchmarks/gpu_check.py, the script a GPU machine runs, kept working by its CPU dry run."""
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--cpu-dry-run", "--no-parity",
         "--steps", "2", "--precisions", "fp32", "fp16"],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith(("fp32", "fp16"))]
    assert len(rows) == 8 and all(row[3] == "yes" for row in rows)
