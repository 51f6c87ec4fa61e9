import json
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "official_dvt"


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"release reference data not found at {path}")
    return path


def load_fixture(family: str):
    """(config, weights, io) of a release fixture cascade: family 't2t' or 'deit'."""
    from dvt_shared import config_from_release_json

    config = config_from_release_json(json.loads(reference_file(f"{family}_mini_config.json").read_text()), f"{family}_mini")
    weights = dict(np.load(reference_file(f"{family}_mini_weights.npz")))
    io = dict(np.load(reference_file(f"{family}_mini_io.npz")))
    return config, weights, io


def release_keys(name: str) -> dict:
    return json.loads(reference_file(name).read_text())
