"""The release's reference data: the one place tests read it.

The two reference cascades' config, weights and logits ship with dvt_cli (`dvt demo` checks them,
dvt_cli/data/release/); the rest, which only tests read, is in tests/fixtures/release/.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dvt_cli.demo import RELEASE_CASCADES, RELEASE_CASCADES_DIR

RELEASE_DIR = Path(__file__).resolve().parent / "fixtures" / "release"
CASCADES = RELEASE_CASCADES
SHIPPED_FILES = frozenset(f"{name}_{part}" for name in CASCADES for part in ("config.json", "weights.npz", "io.npz"))


def release_file(name: str) -> Path:
    path = (RELEASE_CASCADES_DIR if name in SHIPPED_FILES else RELEASE_DIR) / name
    if not path.exists():
        raise FileNotFoundError(f"release fixture {path} is missing from this checkout")
    return path


def release_json(name: str) -> dict:
    return json.loads(release_file(name).read_text())


def release_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(release_file(name)) as data:
        return dict(data)


def cascade_config(name: str):
    """The DVTConfig of the release cascade `name` ('t2t_mini' or 'deit_mini')."""
    from dvt_shared import config_from_release_json

    return config_from_release_json(release_json(f"{name}_config.json"), name)


def load_cascade(name: str):
    """(config, weights by release key, io: images and per-exit logits) of a release cascade."""
    return cascade_config(name), release_npz(f"{name}_weights.npz"), release_npz(f"{name}_io.npz")
