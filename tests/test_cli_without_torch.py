"""`dvt --help` and `dvt convert x.ckpt y.safetensors` in a Python where torch cannot be imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dvt_shared.weight_format import load_canonical

# Installed through PYTHONPATH: every import of torch, torchvision or timm fails as if they were absent.
BLOCKER = '''
import sys

BLOCKED = ("torch", "torchvision", "timm")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]), "GLOG_v": "3"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_blocker_blocks_torch(tmp_path):
    result = _run(tmp_path, "-c", "import torch")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_help_needs_no_torch(tmp_path):
    result = _run(tmp_path, "-m", "dvt_cli", "--help")
    assert result.returncode == 0, result.stderr
    assert "convert" in result.stdout


def test_convert_ckpt_to_safetensors_needs_no_torch(tmp_path):
    import dvt_mindspore

    model = dvt_mindspore.create_model("dvt_t2t_vit_fmnist")
    dvt_mindspore.save_weights(model, tmp_path / "model.ckpt")
    result = _run(tmp_path, "-m", "dvt_cli", "convert", str(tmp_path / "model.ckpt"),
                  str(tmp_path / "model.safetensors"), "--model", "dvt_t2t_vit_fmnist")
    assert result.returncode == 0, result.stderr
    tensors, metadata = load_canonical(tmp_path / "model.safetensors")
    expected = dvt_mindspore.to_canonical(model)
    assert metadata.config.name == "dvt_t2t_vit_fmnist"
    assert list(tensors) != [] and set(tensors) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def test_a_mis_shaped_ckpt_is_refused_without_torch(tmp_path):
    import dvt_mindspore

    dvt_mindspore.save_weights(dvt_mindspore.create_model("dvt_t2t_vit_fmnist", embed_dim=48), tmp_path / "model.ckpt")
    result = _run(tmp_path, "-m", "dvt_cli", "convert", str(tmp_path / "model.ckpt"), str(tmp_path / "out.safetensors"),
                  "--model", "dvt_t2t_vit_fmnist")
    assert result.returncode == 1
    assert "mis-shaped" in result.stderr and not (tmp_path / "out.safetensors").exists()


def test_predict_on_onnx_graphs_needs_no_torch(tmp_path):
    from PIL import Image

    import dvt_torch

    model = dvt_torch.create_model("dvt_t2t_vit_fmnist", embed_dim=24, depth=1, num_heads=2, token_dim=8).eval()
    dvt_torch.save_weights(model, tmp_path / "w.safetensors")
    dvt_torch.export(model, tmp_path / "graphs")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    images = [tmp_path / f"{i}.png" for i in range(len(pixels))]
    for path, image in zip(images, pixels):
        Image.fromarray(image, mode="L").save(path)
    result = _run(tmp_path, "-c", "import dvt_onnx, sys; assert 'torch' not in sys.modules")
    assert result.returncode == 0, result.stderr
    result = _run(tmp_path, "-m", "dvt_cli", "predict", "--backend", "onnx", "--onnx-dir", str(tmp_path / "graphs"),
                  "--weights", str(tmp_path / "w.safetensors"), "--thresholds", "0,0,0", *map(str, images))
    assert result.returncode == 0, result.stderr
    # threshold 0: every image leaves at the first exit
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == len(images) and all(row[-3] == "0" for row in rows)
