import json
import os
import stat

import numpy as np
import pytest
import safetensors.numpy

import dvt_shared.weight_format as weight_format
from dvt_shared import (
    FORMAT_VERSION,
    WeightMetadata,
    atomic_write_bytes,
    atomic_writer,
    check_state_dict,
    get_model_config,
    load_canonical,
    read_canonical_metadata,
    save_canonical,
    sha256_file,
)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "less_less_token.cls_token": rng.standard_normal((1, 1, 96)).astype(np.float32),
        "less_less_token.head.weight": rng.standard_normal((10, 96)).astype(np.float32),
        "less_token.reuse.weight": rng.standard_normal((48, 96)).astype(np.float16),
        "normal_token.blocks.0.attn.qkv.weight": rng.standard_normal((288, 96)).astype(np.float32)[:, ::2],
        "normal_token.step": np.array(7, dtype=np.int64),
    }


def _metadata() -> WeightMetadata:
    return WeightMetadata(
        config=get_model_config("dvt_t2t_vit_fmnist"),
        exit_flops=[0.0123, 0.0456, 0.0789],
        thresholds=[0.83, 0.61, float("-inf")],
        provenance="trained by tests/test_weight_format.py",
        extra={"metrics": json.dumps({"top1": [71.5, 80.25, 84.0]})},
    )


def _temp_files(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors, metadata = _tensors(), _metadata()
    save_canonical(path, tensors, metadata)
    loaded, loaded_meta = load_canonical(path)
    assert list(loaded) == sorted(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == np.ascontiguousarray(array).tobytes()
    assert loaded_meta == metadata
    assert loaded_meta.config == get_model_config("dvt_t2t_vit_fmnist")
    assert loaded_meta.config_name == "dvt_t2t_vit_fmnist" and loaded_meta.num_classes == 10
    assert read_canonical_metadata(path) == metadata


def test_metadata_is_stored_under_dvt_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_canonical(path, _tensors(), WeightMetadata(config=get_model_config("dvt_t2t_vit_fmnist")))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    strings = json.loads(path.read_bytes()[8:8 + header_len])["__metadata__"]
    assert strings["format"] == FORMAT_VERSION
    assert set(strings) == {"format", "dvt.config", "dvt.exit_flops", "dvt.thresholds", "dvt.exit_policy",
                            "dvt.provenance", "dvt.extra"}
    assert json.loads(strings["dvt.thresholds"]) is None
    assert json.loads(strings["dvt.exit_policy"]) == "max-softmax"
    assert json.loads(strings["dvt.config"])["name"] == "dvt_t2t_vit_fmnist"


def test_the_exit_policy_is_recorded_and_older_files_read_as_max_softmax():
    config = get_model_config("dvt_t2t_vit_fmnist")
    metadata = WeightMetadata(config=config, thresholds=[0.5, 0.5, -1e8], exit_policy="entropy")
    strings = metadata.to_strings()
    assert WeightMetadata.from_strings(strings).exit_policy == "entropy"
    older = {key: value for key, value in strings.items() if key != "dvt.exit_policy"}
    assert WeightMetadata.from_strings(older).exit_policy == "max-softmax"
    with pytest.raises(ValueError, match="unknown exit policy 'halting'"):
        WeightMetadata(config=get_model_config("dvt_t2t_vit_fmnist"), exit_policy="halting")


def test_metadata_validation():
    with pytest.raises(ValueError, match="3 exits"):
        WeightMetadata(config=get_model_config("dvt_t2t_vit_fmnist"), exit_flops=[1.0, 2.0])
    with pytest.raises(TypeError, match="extra"):
        WeightMetadata(config=get_model_config("dvt_t2t_vit_fmnist"), extra={"n": 3})


def test_save_rejects_non_numpy_and_unstorable(tmp_path):
    with pytest.raises(TypeError, match="numpy array"):
        save_canonical(tmp_path / "w.safetensors", {"a": [1.0, 2.0]}, _metadata())
    with pytest.raises(TypeError, match="complex"):
        save_canonical(tmp_path / "w.safetensors", {"a": np.zeros(2, np.complex64)}, _metadata())
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1, -100])
def test_truncated_file_is_reported(tmp_path, keep):
    path = tmp_path / "w.safetensors"
    save_canonical(path, _tensors(), _metadata())
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ValueError, match="truncated") as info:
        load_canonical(path)
    assert str(path) in str(info.value)


def test_random_garbage_is_reported(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ValueError, match="not a safetensors weight file") as info:
        load_canonical(path)
    assert str(path) in str(info.value)


def test_corrupt_header_is_reported(tmp_path):
    path = tmp_path / "w.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # JSON cut short
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_canonical(path)


def test_torch_like_file_gets_conversion_hint(tmp_path):
    path = tmp_path / "release.pth"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(ValueError, match="PyTorch checkpoint; convert it"):
        load_canonical(path)


def test_plain_safetensors_is_not_canonical(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(safetensors.numpy.save(_tensors(), metadata={"format": "np"}))
    with pytest.raises(ValueError, match="not a DVT canonical weight file; convert it with"):
        load_canonical(path)


def test_newer_format_version_is_reported(tmp_path):
    path = tmp_path / "w.safetensors"
    strings = dict(_metadata().to_strings(), format="dvt-canonical-v2")
    path.write_bytes(safetensors.numpy.save(_tensors(), metadata=strings))
    with pytest.raises(ValueError, match="reads only 'dvt-canonical-v1'"):
        load_canonical(path)


def test_bad_metadata_json_is_reported(tmp_path):
    path = tmp_path / "w.safetensors"
    strings = dict(_metadata().to_strings())
    strings["dvt.exit_flops"] = "[0.1, 0.2,"
    path.write_bytes(safetensors.numpy.save(_tensors(), metadata=strings))
    with pytest.raises(ValueError, match="dvt.exit_flops is not valid JSON") as info:
        load_canonical(path)
    assert str(path) in str(info.value)


def test_bad_config_is_reported(tmp_path):
    path = tmp_path / "w.safetensors"
    strings = dict(_metadata().to_strings())
    strings["dvt.config"] = json.dumps(dict(json.loads(strings["dvt.config"]), unknown_field=1))
    path.write_bytes(safetensors.numpy.save(_tensors(), metadata=strings))
    with pytest.raises(ValueError, match="not a valid DVTConfig"):
        load_canonical(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_canonical(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        load_canonical(tmp_path)
    with pytest.raises(IsADirectoryError):
        save_canonical(tmp_path, _tensors(), _metadata())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_canonical(tmp_path / "no_dir" / "w.safetensors", _tensors(), _metadata())


def test_check_state_dict_reports_every_problem_at_once():
    expected = {"a": (2, 3), "b": (4,), "c": (1,), "d": (5, 5), "e": (7,)}
    tensors = {"a": np.zeros((2, 3)), "b": np.zeros((3,)), "d": np.zeros((5, 6)), "x": np.zeros(1), "y": (2, 2)}
    with pytest.raises(ValueError) as info:
        check_state_dict(expected, tensors, source="w.safetensors")
    message = str(info.value)
    for name in ("c", "e", "x", "y"):
        assert f"  {name}\n" in message + "\n"
    assert "b: expected (4,) vs got (3,)" in message
    assert "d: expected (5, 5) vs got (5, 6)" in message
    assert "2 missing, 2 unexpected, 2 mis-shaped" in message and "w.safetensors" in message
    check_state_dict({"a": (2, 3)}, {"a": np.zeros((2, 3))})


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_canonical(path, _tensors(0), _metadata())
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full while serialising")

    monkeypatch.setattr(weight_format.safetensors.numpy, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_canonical(path, _tensors(1), _metadata())
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_writer_failing_mid_way_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    atomic_write_bytes(path, b"old contents")
    with pytest.raises(OSError, match="device gone"):
        with atomic_writer(path) as handle:
            handle.write(b"half of the new")
            assert _temp_files(tmp_path)  # the partial data goes to a temp file beside the target
            raise OSError("device gone")
    assert path.read_bytes() == b"old contents"
    assert _temp_files(tmp_path) == []

    def failing_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old contents"
    assert _temp_files(tmp_path) == []


def test_atomic_writer_text_mode_permissions_and_symlinks(tmp_path):
    path = tmp_path / "notes.txt"
    with atomic_writer(path, "w") as handle:
        handle.write("größe\n")
    assert path.read_text(encoding="utf-8") == "größe\n"
    os.chmod(path, 0o640)
    atomic_write_bytes(path, b"x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    atomic_write_bytes(link, b"via link")
    assert link.is_symlink() and path.read_bytes() == b"via link"
    with pytest.raises(ValueError, match="mode"):
        with atomic_writer(path, "ab"):
            pass


def test_atomic_writer_permission_error_names_path(tmp_path, monkeypatch):
    real_open = os.open

    def no_create(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_create)
    target = tmp_path / "w.bin"
    with pytest.raises(PermissionError, match="cannot write .*w.bin: no permission"):
        atomic_write_bytes(target, b"x")


def _owner_access(path, mode, **kwargs):
    """os.access as a non-root owner sees it: root's os.access ignores permission bits."""
    bits = os.stat(path).st_mode
    wanted = {os.R_OK: stat.S_IRUSR, os.W_OK: stat.S_IWUSR, os.X_OK: stat.S_IXUSR}
    return all(bits & flag for want, flag in wanted.items() if mode & want)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_read_only_file_and_directory_are_reported(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", _owner_access)
    path = tmp_path / "w.bin"
    path.write_bytes(b"x")
    os.chmod(path, 0o444)
    with pytest.raises(PermissionError, match="read-only"):
        atomic_write_bytes(path, b"y")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        with pytest.raises(PermissionError, match="no permission"):
            atomic_write_bytes(locked / "w.bin", b"y")
    finally:
        os.chmod(locked, 0o755)


def test_sha256_file(tmp_path):
    import hashlib

    data = np.random.default_rng(2).bytes(3 * 1024 + 5)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()
