"""The weights in weights/ match their manifest, and a file that does not is refused."""
import json

import pytest

from dvt_cli import CommandError, demo
from dvt_shared.models import config_from_dict, model_gflops
from dvt_shared.weight_format import load_canonical


def test_manifest_entries_match_their_files():
    if not demo.MANIFEST.is_file():
        pytest.skip("no shipped weights yet")
    manifest = json.loads(demo.MANIFEST.read_text())
    assert set(manifest) == {"dvt", "static", "vt", "resnet"}
    for role, entry in manifest.items():
        path, _ = demo.shipped_weights(role)
        _, metadata = load_canonical(path)
        assert metadata.config == config_from_dict(entry["config"])
    assert len(manifest["dvt"]["thresholds"]) == 3
    _, metadata = load_canonical(demo.shipped_weights("dvt")[0])
    assert metadata.thresholds == manifest["dvt"]["thresholds"]
    assert (manifest["vt"]["config"]["family"], manifest["resnet"]["config"]["family"]) == ("vt_resnet", "resnet")
    for role in ("vt", "resnet"):
        entry = manifest[role]
        assert entry["gflops"] == model_gflops(config_from_dict(entry["config"]))[0]
        assert entry["params"] > 0 and 10.0 < entry["test_accuracy"] <= 100.0


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not the shipped bytes")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"dvt": {"file": "w.safetensors", "sha256": "0" * 64}}))
    monkeypatch.setattr(demo, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(demo, "MANIFEST", manifest)
    with pytest.raises(CommandError, match="does not match the manifest"):
        demo.shipped_weights("dvt")
    with pytest.raises(CommandError, match="lists no 'static'"):
        demo.shipped_weights("static")
    weights.unlink()
    with pytest.raises(CommandError, match="missing"):
        demo.shipped_weights("dvt")
