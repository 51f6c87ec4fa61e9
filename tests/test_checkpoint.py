import os
import pathlib
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dvt_torch import checkpoint as ckpt  # noqa: E402
from dvt_torch.checkpoint import read_release_checkpoint, write_release_checkpoint  # noqa: E402

REFUSED = "it contains pickled objects other than tensors and plain containers (loading it would run code)"


class TouchOnLoad:
    """Unpickling this calls pathlib.Path.touch(marker): a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class ShellOnLoad(TouchOnLoad):
    """Unpickling this runs a shell command (os.system) that creates marker."""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "less_less_token.cls_token": rng.standard_normal((1, 1, 8)).astype(np.float32),
        "less_less_token.head.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "less_token.reuse.weight": rng.standard_normal((4, 8)).astype(np.float16),
        "normal_token.norm.bias": rng.standard_normal(8).astype(np.float32),
    }


def _torch_state_dict(seed: int = 0) -> dict[str, "torch.Tensor"]:
    return {k: torch.from_numpy(v) for k, v in _state_dict(seed).items()}


def test_release_round_trip(tmp_path):
    path = tmp_path / "release.pth.tar"
    weights = _state_dict()
    threshold = np.random.default_rng(3).random((59, 3)).astype(np.float32)
    write_release_checkpoint(
        path, weights, flops=[0.45, 1.2, 2.8], dynamic_threshold=threshold,
        anytime_classification=[70.0, 76.5, 78.25], budgeted_batch_classification=[[0.5, 1.0], [71.0, 77.0]],
    )
    read = read_release_checkpoint(path)
    assert list(read.state_dict) == list(weights)
    for name, array in weights.items():
        assert read.state_dict[name].dtype == array.dtype
        assert read.state_dict[name].tobytes() == array.tobytes()
    assert read.flops == [0.45, 1.2, 2.8]
    assert read.dynamic_threshold.dtype == np.float32 and read.dynamic_threshold.tobytes() == threshold.tobytes()
    assert read.anytime_classification == [70.0, 76.5, 78.25]
    assert read.budgeted_batch_classification == [[0.5, 1.0], [71.0, 77.0]]
    assert read.extra_keys == []
    # What the release's own scripts index into.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {
        "model_state_dict", "flops", "dynamic_threshold", "anytime_classification", "budgeted_batch_classification",
    }
    assert tuple(raw["dynamic_threshold"].shape) == (59, 3)


def test_release_layout_with_training_state(tmp_path):
    path = tmp_path / "release.pth"
    torch.save({
        "model_state_dict": _torch_state_dict(), "flops": torch.tensor([0.5, 1.0, 2.0]),
        "dynamic_threshold": torch.rand(59, 3, dtype=torch.float64), "epoch": 299,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
    }, path)
    read = read_release_checkpoint(path)
    assert read.flops == [0.5, 1.0, 2.0]
    assert read.dynamic_threshold.shape == (59, 3) and read.dynamic_threshold.dtype == np.float64
    assert read.anytime_classification is None
    assert read.extra_keys == ["epoch", "optimizer"]


@pytest.mark.parametrize("layout", ["state_dict", "model", "flat"])
def test_other_layouts(tmp_path, layout):
    path = tmp_path / "ckpt.pth"
    weights = _torch_state_dict()
    torch.save(weights if layout == "flat" else {layout: weights, "epoch": 3}, path)
    read = read_release_checkpoint(path)
    assert list(read.state_dict) == list(weights)
    assert read.extra_keys == ([] if layout == "flat" else ["epoch"])


@pytest.mark.parametrize("legacy", [False, True])
def test_ddp_prefix_is_stripped(tmp_path, legacy):
    path = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in _torch_state_dict().items()}}, path,
               _use_new_zipfile_serialization=not legacy)
    read = read_release_checkpoint(path)
    assert list(read.state_dict) == list(_state_dict())


def test_ddp_prefix_collision_is_reported(tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"module.a": torch.zeros(1), "a": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="collide"):
        read_release_checkpoint(path)


def test_bfloat16_is_widened_exactly(tmp_path):
    path = tmp_path / "bf16.pth"
    value = torch.randn(4, 4).to(torch.bfloat16)
    torch.save({"w": value}, path)
    read = read_release_checkpoint(path)
    assert read.state_dict["w"].dtype == np.float32
    assert np.array_equal(read.state_dict["w"], value.float().numpy())


@pytest.mark.parametrize("payload", [TouchOnLoad, ShellOnLoad], ids=["python-call", "shell-command"])
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_without_running(tmp_path, legacy, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": _torch_state_dict(), "payload": payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    if not legacy:
        # The payload really is in the file: the pickle names the function it would call.
        with zipfile.ZipFile(path) as archive:
            pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        assert b"touch" in pickled
    with pytest.raises(ValueError) as info:
        read_release_checkpoint(path)
    assert f"refused to load {path}: {REFUSED}" in str(info.value)
    assert not marker.exists()


def test_every_loader_refuses_a_command_on_unpickling(tmp_path, capsys):
    """The same crafted file through `dvt convert` and as a training checkpoint for --resume."""
    from dvt_cli import main
    from dvt_torch.train_state import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": _torch_state_dict(), "format": "dvt-train-checkpoint-v1",
                "payload": ShellOnLoad(marker)}, path)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", "dvt_t2t_vit_fmnist"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and REFUSED in err
    with pytest.raises(ValueError) as info:
        load_checkpoint(str(path))
    assert REFUSED in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_loader_only_ever_uses_weights_only(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    path = tmp_path / "w.pth"
    torch.save(_torch_state_dict(), path)
    read_release_checkpoint(path)
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"GIF89a" + np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as info:
        read_release_checkpoint(path)
    assert str(path) in str(info.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_release_checkpoint(empty)


def test_safetensors_file_gets_a_hint(tmp_path):
    import safetensors.numpy

    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors.numpy.save(_state_dict()))
    with pytest.raises(ValueError, match="load_canonical"):
        read_release_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoints_are_reported_as_damaged(tmp_path, legacy):
    full = tmp_path / "full.pth"
    torch.save({"model_state_dict": _torch_state_dict(), "flops": [1.0, 2.0, 3.0]}, full,
               _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    for keep in range(40, len(data), max(1, len(data) // 60)):
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError) as info:
            read_release_checkpoint(cut)
        message = str(info.value)
        assert str(cut) in message
        assert "truncated or corrupt" in message, (keep, message)


def test_no_tensors_and_wrong_types(tmp_path):
    path = tmp_path / "empty_dict.pth"
    torch.save({"epoch": 3, "flops": [1.0]}, path)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_release_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds a list"):
        read_release_checkpoint(path)
    torch.save({"model_state_dict": {}}, path)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_release_checkpoint(path)
    torch.save({"model_state_dict": {"a": torch.zeros(1), "b": 3}}, path)
    with pytest.raises(ValueError, match="not tensors: \\['b'\\]"):
        read_release_checkpoint(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_release_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(IsADirectoryError):
        read_release_checkpoint(tmp_path)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "release.pth"
    write_release_checkpoint(path, _state_dict(0))
    before = path.read_bytes()
    real_save = torch.save

    def save_then_die(obj, handle, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        write_release_checkpoint(path, _state_dict(1))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert path.read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
