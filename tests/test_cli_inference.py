"""`dvt calibrate`, `dvt predict` (three backends) and `dvt export`."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dvt_cli import backends, main
from dvt_shared import get_model_config
from dvt_shared.data_config import default_data_config
from dvt_shared.datasets import DEFAULT_FASHION_MNIST_DIR
from dvt_shared.flops import cumulative_flops, exit_gflops
from dvt_shared.weight_format import WeightMetadata, load_canonical, save_canonical
from dvt_torch import DVT
from dvt_torch.convert import to_canonical

TINY = dict(embed_dim=24, depth=1, num_heads=2, token_dim=8, num_classes=10)


def tiny_weights(folder, name: str):
    torch.manual_seed(0)
    model = DVT(get_model_config(name, **TINY))
    with torch.no_grad():  # spread the confidences so that every exit gets images
        for p in model.parameters():
            if p.dim() >= 2 and p.requires_grad:
                p.normal_(0, 1.5 / np.sqrt(p[0].numel()))
    path = folder / f"{name}.safetensors"
    save_canonical(path, to_canonical(model),
                   WeightMetadata(config=model.config, exit_flops=list(exit_gflops(model.config))))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("weights"), "dvt_t2t_vit_fmnist")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_calibrate_stores_thresholds(weights, tmp_path):
    if not (DEFAULT_FASHION_MNIST_DIR and __import__("os").path.isdir(DEFAULT_FASHION_MNIST_DIR)):
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
    out = tmp_path / "calibrated.safetensors"
    assert main(["calibrate", "--weights", str(weights), "--limit", "300", "--p", "1.5", "--out", str(out)]) == 0
    tensors, metadata = load_canonical(out)
    assert metadata.thresholds is not None and len(metadata.thresholds) == 3 and metadata.thresholds[-1] == -1e8
    original, _ = load_canonical(weights)
    assert all(np.array_equal(tensors[k], original[k]) for k in original)


def test_calibrate_and_predict_with_the_entropy_policy(weights, images, tmp_path, capsys):
    """`dvt calibrate --exit-policy entropy` stores entropy thresholds and the policy's name; `dvt predict`
    then decides by that policy (its exits are the policy's on the model's own logits), and refuses to apply
    them under another policy."""
    if not (DEFAULT_FASHION_MNIST_DIR and os.path.isdir(DEFAULT_FASHION_MNIST_DIR)):
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
    from dvt_cli.images import load_images
    from dvt_cli.inference import all_exit_logits
    from dvt_shared.error_bounds import FP32, decision_agreement
    from dvt_shared.exit_policy import ENTROPY, softmax

    out = tmp_path / "entropy.safetensors"
    assert main(["calibrate", "--weights", str(weights), "--limit", "300", "--p", "0.8", "--exit-policy", "entropy",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("entropy thresholds")
    tensors, metadata = load_canonical(out)
    assert metadata.exit_policy == "entropy" and metadata.thresholds[-1] == -1e8
    assert main(["predict", "--weights", str(out), *images]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].endswith("entropy confidence")
    exits = [int(line.split()[2]) for line in printed[1:-1]]
    # calibrate recorded the data config these weights were read with: the default rule's, named by Fashion-MNIST
    assert metadata.data_config == default_data_config(metadata.config)
    logits = all_exit_logits(metadata.config, tensors, load_images(images, metadata.data_config))
    margins = ENTROPY.margin(FP32.exit_bounds(metadata.config.depth, logits))
    agreement = decision_agreement(ENTROPY.scores(softmax(logits)), np.array(exits), metadata.thresholds, margins)
    assert agreement.unexplained.size == 0, f"images {agreement.unexplained} exit elsewhere than the policy says"
    assert main(["predict", "--weights", str(out), "--exit-policy", "max-softmax", *images]) == 1
    assert "holds thresholds for the entropy policy" in capsys.readouterr().err


def spread_thresholds(weights, images) -> str:
    """Thresholds half-way between confidences (no backend's rounding can flip a decision) that
    send half of `images` out at exit 0 and one more at exit 1."""
    from dvt_cli.images import load_images
    from dvt_shared import confidences, softmax
    from dvt_torch.convert import from_canonical

    tensors, metadata = load_canonical(weights)
    model = from_canonical(DVT(metadata.config), tensors).eval()
    with torch.inference_mode():
        logits = model.forward_exits(torch.from_numpy(load_images(images, default_data_config(metadata.config))))
    conf = confidences(softmax(np.stack([o.numpy() for o in logits])))
    first = np.sort(conf[0])[::-1]
    half = len(first) // 2
    thr0 = (first[half - 1] + first[half]) / 2
    second = np.sort(conf[1][conf[0] < thr0])[::-1]
    thr1 = (second[0] + second[1]) / 2
    return f"{thr0!r},{thr1!r},-1e8"


def test_predict_agrees_across_backends(weights, images, capsys):
    outputs = {}
    thresholds = spread_thresholds(weights, images)
    for backend in ("torch", "mindspore", "onnx"):
        assert main(["predict", "--weights", str(weights), "--backend", backend, "--thresholds", thresholds,
                     *images]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        outputs[backend] = [line.split()[:3] for line in lines[1:-1]]  # image, class, exit
        assert len(outputs[backend]) == len(images)
    assert outputs["torch"] == outputs["mindspore"] == outputs["onnx"]
    exits = {exit_index for _, _, exit_index in outputs["torch"]}
    assert len(exits) > 1, f"every image left at exit {exits}: the thresholds test no early exit"


def test_predict_without_thresholds_is_refused(weights, images, capsys):
    assert main(["predict", "--weights", str(weights), images[0]]) == 1
    assert "holds no thresholds" in capsys.readouterr().err


def test_predict_reads_folders_of_images(weights, images, tmp_path, capsys):
    """A folder is read as its images (recursive, by extension, hidden ones skipped), in the order `--ray` reads
    it; a parquet input is left to --ray, with the way to pass it."""
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(images[:3]):
        target = folder / ("sub" if i == 2 else "") / os.path.basename(path)
        target.write_bytes(open(path, "rb").read())
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(open(images[3], "rb").read())
    thresholds = ["--thresholds", "0.5,0.5,-1e8"]
    assert main(["predict", "--weights", str(weights), *thresholds, str(folder)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:-1]]
    expected = [str(folder / "img0.png"), str(folder / "img1.png"), str(folder / "sub" / "img2.png")]
    assert [row[0] for row in rows] == expected
    assert main(["predict", "--weights", str(weights), *thresholds, *expected]) == 0
    assert [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:-1]] == rows
    (tmp_path / "images.parquet").write_bytes(b"")
    assert main(["predict", "--weights", str(weights), *thresholds, str(tmp_path / "images.parquet")]) == 1
    assert "parquet inputs are read by Ray Data: pass --ray" in capsys.readouterr().err


def test_predict_missing_image(weights, capsys):
    assert main(["predict", "--weights", str(weights), "--thresholds", "0.5,0.5,-1e8", "/nonexistent.png"]) == 1
    assert "not an image file" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,suffix,extra", [("onnx", ".onnx", []), ("mindir", ".mindir", ["--gears", "dynamic"])])
def test_export_writes_one_graph_per_stage(weights, tmp_path, fmt, suffix, extra):
    assert main(["export", "--weights", str(weights), "--format", fmt, "--out", str(tmp_path), *extra]) == 0
    manifest = json.loads(next(tmp_path.glob("dvt_*.json")).read_text())
    assert [s["file"] for s in manifest["stages"]] == [f"stage{k}{suffix}" for k in range(3)]
    assert manifest["stages"][1]["inputs"] == ["images", "prev_features", "prev_relations"]
    assert all((tmp_path / s["file"]).is_file() for s in manifest["stages"])


def test_export_mindir_per_gear(tmp_path):
    """One graph per stage and gear; the static baseline's single stage keeps the compiles to two."""
    weights = tiny_weights(tmp_path, "dvt_t2t_vit_fmnist_static")
    assert main(["export", "--weights", str(weights), "--format", "mindir", "--gears", "1,4",
                 "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "dvt_mindir.json").read_text())
    assert manifest["gears"] == [1, 4]
    assert [[g["file"] for g in s["gears"]] for s in manifest["stages"]] == [["stage0_b1.mindir", "stage0_b4.mindir"]]


@pytest.mark.parametrize("precision,backend", [
    ("bf16", "torch"), ("fp16", "torch"),
    pytest.param("fp16", "mindspore", marks=pytest.mark.slow),  # compiles every gear twice
])
def test_predict_at_reduced_precision(weights, images, capsys, precision, backend):
    thresholds = spread_thresholds(weights, images)
    assert main(["predict", "--weights", str(weights), "--backend", backend, "--thresholds", thresholds, *images]) == 0
    fp32 = [line.split()[:3] for line in capsys.readouterr().out.strip().splitlines()[1:-1]]
    assert main(["predict", "--weights", str(weights), "--backend", backend, "--precision", precision,
                 "--thresholds", thresholds, *images]) == 0
    reduced = [line.split()[:3] for line in capsys.readouterr().out.strip().splitlines()[1:-1]]
    assert len(reduced) == len(images)
    # same classes; exits may move only for an image whose confidence sits at a threshold
    assert [row[1] for row in reduced] == [row[1] for row in fp32]


@pytest.mark.parametrize("precision,backend", [("fp16", "onnx"), ("bf16", "mindspore"), ("bf16", "onnx")])
def test_precision_that_does_not_exist_is_refused(weights, images, capsys, precision, backend):
    assert main(["predict", "--weights", str(weights), "--backend", backend, "--precision", precision,
                 "--thresholds", "0.5,0.5,-1e8", images[0]]) == 1
    err = capsys.readouterr().err
    assert f"--precision {precision} does not exist for --backend {backend}" in err


@pytest.mark.slow
def test_demo_times_the_evaluations_engines(weights):
    """The demo's speedup runs every exit, then real early exit, through the engines the evaluation
    kept; its exits and MACs are the engine's own, and the thresholds it was given stay set."""
    from dvt_cli.demo import SPEEDUP_RUNS, speedup
    from dvt_cli.evaluate import Evaluated

    tensors, metadata = load_canonical(weights)
    images = np.random.default_rng(4).standard_normal((96, 1, 28, 28)).astype(np.float32)
    evaluated = Evaluated(metadata.config, tensors, None, np.zeros((3, 96, 10), np.float32), None, 0)
    thresholds = [0.5, 0.5, -1e8]
    rows = speedup(evaluated, images, thresholds)
    assert [r["backend"] for r in rows] == [label for _, _, label in SPEEDUP_RUNS]
    macs = np.asarray(cumulative_flops(metadata.config))
    for (backend, precision, _), row in zip(SPEEDUP_RUNS, rows):
        engine = evaluated.engine(backend, precision)
        np.testing.assert_array_equal(engine.thresholds, thresholds)
        expected = engine.predict(backends.load(backend).tensor(images)).exit_index
        np.testing.assert_array_equal(row["exit_index"], expected)
        assert row["theoretical"] == pytest.approx(macs[-1] / macs[expected].mean())
        assert row["every_exit_s"] > 0 and row["engine_s"] > 0
        assert row["practical"] == pytest.approx(row["every_exit_s"] / row["engine_s"])


def test_demo_checks_the_release_cascades_shipped_with_the_package(monkeypatch, tmp_path):
    """The random-weight demo runs the release's cascades from dvt_cli's package data and matches the
    release's logits (to float32 rounding; test_dvt_model holds the exact bounds); an installation
    without them is refused, naming the missing file."""
    from dvt_cli import CommandError, demo

    deltas = demo.release_cascade_deltas(backends.load("torch"))
    assert list(deltas) == list(demo.RELEASE_CASCADES)
    for name, per_exit in deltas.items():
        assert len(per_exit) == 3 and max(per_exit) < 1e-4, (name, per_exit)
    monkeypatch.setattr(demo, "RELEASE_CASCADES_DIR", tmp_path)
    with pytest.raises(CommandError, match="t2t_mini_config.json is missing"):
        demo.release_cascade_deltas(backends.load("torch"))


def test_mindspore_logs_are_silenced_unless_verbose(monkeypatch):
    from dvt_cli import quiet_mindspore

    monkeypatch.delenv("GLOG_v", raising=False)
    quiet_mindspore(verbose=True)
    assert "GLOG_v" not in os.environ
    quiet_mindspore(verbose=False)
    assert os.environ["GLOG_v"] == "3"


@pytest.mark.parametrize(
    "backend, precision",
    [("torch", "bf16"), ("torch", "fp16"), pytest.param("mindspore", "fp16", marks=pytest.mark.slow)],
)
def test_evaluate_precision_agreement(weights, backend, precision):
    """`dvt evaluate --precision` scores the same images at the reduced precision and compares with fp32."""
    from dvt_cli.evaluate import Evaluated, precision_agreement
    from dvt_cli.inference import all_exit_logits

    tensors, metadata = load_canonical(weights)
    images = np.random.default_rng(3).standard_normal((64, 1, 28, 28)).astype(np.float32)
    logits = all_exit_logits(metadata.config, tensors, images)
    labels = logits[-1].argmax(-1)  # fp32's last exit is right by construction
    evaluated = Evaluated(metadata.config, tensors, None, logits, None, 0)
    got = precision_agreement(evaluated, images, labels, [0.5, 0.5, -1e8], backend, precision)
    assert got["precision"] == precision and got["runs_on"] == f"{backend} {precision}" and got["images"] == 64
    assert len(got["exit_accuracy"]) == len(got["same_prediction_per_exit"]) == 3
    # reduced precision moves confidences a little, not a lot: nearly every prediction stands
    assert min(got["same_prediction_per_exit"]) >= 60 and got["exit_accuracy"][-1] >= 60 / 64 * 100
    assert 0 < got["max_abs_conf_delta"] < 0.05
    # on the first test images only, against fp32's scores of those, through the engine kept from above
    assert evaluated.engine(backend, precision) is evaluated.engine(backend, precision)
    first = precision_agreement(evaluated, images[:32], labels[:32], [0.5, 0.5, -1e8], backend, precision)
    reduced = evaluated.exit_logits(images[:32], backend, precision)
    assert first["images"] == 32
    assert first["same_prediction_per_exit"] == (reduced.argmax(-1) == logits[:, :32].argmax(-1)).sum(axis=1).tolist()
