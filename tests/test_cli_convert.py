"""`dvt convert` between release .pth, canonical .safetensors and MindSpore .ckpt."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dvt_torch
from dvt_cli import main
from dvt_mindspore.checkpoint import load_ckpt
from dvt_shared.weight_format import load_canonical
from dvt_torch.checkpoint import read_release_checkpoint, write_release_checkpoint
from dvt_torch.convert import to_canonical

NAME = "dvt_t2t_vit_fmnist"
SMALL = dict(num_classes=4)


@pytest.fixture(scope="module")
def release_pth(tmp_path_factory) -> tuple[Path, dict]:
    torch.manual_seed(0)
    tensors = to_canonical(dvt_torch.create_model(NAME, **SMALL))
    path = tmp_path_factory.mktemp("release") / "dvt_fmnist.pth.tar"
    write_release_checkpoint(path, tensors, flops=[0.01, 0.02, 0.03])
    return path, tensors


def run(*args) -> int:
    return main([str(a) for a in args])


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_round_trip_through_every_format_is_bit_exact(release_pth, tmp_path, capsys):
    pth, tensors = release_pth
    first, ckpt, second, back = (tmp_path / n for n in ("a.safetensors", "b.ckpt", "c.safetensors", "d.pth"))
    assert run("convert", pth, first, "--model", NAME) == 0
    assert run("convert", first, ckpt) == 0
    assert run("convert", ckpt, second, "--model", NAME, "--num-classes", 4) == 0
    assert run("convert", second, back) == 0
    assert "wrote" in capsys.readouterr().out

    first_tensors, first_meta = load_canonical(first)
    second_tensors, second_meta = load_canonical(second)
    assert_same(first_tensors, tensors)
    assert_same(load_ckpt(ckpt), tensors)
    assert_same(second_tensors, tensors)
    assert_same(read_release_checkpoint(back).state_dict, tensors)
    assert first_meta.config.name == second_meta.config.name == NAME
    assert first_meta.config.num_classes == 4 and first_meta.exit_flops == [0.01, 0.02, 0.03]


def fails(capsys, *args) -> str:
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_source(tmp_path, capsys):
    err = fails(capsys, "convert", tmp_path / "absent.pth", tmp_path / "x.safetensors", "--model", NAME)
    assert err.startswith("dvt convert: error:") and "absent.pth does not exist" in err


@pytest.mark.parametrize("src,dst", [("weights.onnx", "x.safetensors"), ("real.pth", "x.h5")])
def test_unknown_extension(release_pth, tmp_path, capsys, src, dst):
    src = release_pth[0] if src == "real.pth" else tmp_path / src
    err = fails(capsys, "convert", src, tmp_path / dst, "--model", NAME)
    assert "cannot tell the weight format" in err and ".safetensors" in err
    assert not (tmp_path / dst).exists()


def test_source_without_config_needs_model(release_pth, tmp_path, capsys):
    err = fails(capsys, "convert", release_pth[0], tmp_path / "x.safetensors")
    assert "--model NAME" in err and NAME in err


def test_wrong_model_lists_the_mismatch(release_pth, tmp_path, capsys):
    err = fails(capsys, "convert", release_pth[0], tmp_path / "x.ckpt", "--model", NAME, "--num-classes", 7)
    assert "6 mis-shaped" in err and "less_less_token.head.weight: expected (7, 96) vs got (4, 96)" in err
    assert not (tmp_path / "x.ckpt").exists()


def test_conflicting_model_for_a_canonical_source(release_pth, tmp_path, capsys):
    canonical = tmp_path / "a.safetensors"
    assert run("convert", release_pth[0], canonical, "--model", NAME) == 0
    err = fails(capsys, "convert", canonical, tmp_path / "b.ckpt", "--model", "dvt_t2t_vit_12")
    assert "holds a dvt_t2t_vit_fmnist model" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        run("convert", tmp_path / "absent.pth", tmp_path / "x.ckpt", "--debug")


def test_console_script(tmp_path):
    """The installed `dvt` entry point: one error line, exit code 1."""
    script = Path(sys.executable).with_name("dvt")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dvt_cli"]
    result = subprocess.run(
        command + ["convert", str(tmp_path / "absent.pth"), str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"dvt convert: error: {tmp_path / 'absent.pth'} does not exist"]
