"""What a training run saves to continue (`--resume`): its recipe, every rank's random states and
running sums, and the checkpoint file that holds them with the model, optimiser, schedule and EMA.

The checkpoint holds only tensors and plain containers, so torch.load(weights_only=True) reads it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from dvt_shared.io_utils import atomic_writer
from dvt_shared.train_options import train_option_names

from .checkpoint import load_weights_only

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "dvt-train-checkpoint-v1"
# Options that do not change what is computed, so they may differ when resuming (a changed schedule
# length is recomputed at the step reached; a --config's values are compared one by one).
RESUME_FREE_ARGS = frozenset(
    {"resume", "max_steps", "out", "progress", "dump_rank_weights", "workers", "data_dir", "threads", "epochs",
     "cooldown_epochs", "local_rank", "config"}
)


def run_recipe(args, world_size: int, dataset: dict, config_name: str) -> dict:
    """What a run computes: its training options (as JSON gives them back), world size, data and model."""
    import timm

    return json.loads(json.dumps({
        # Only the training options: a host command (`dvt train`) adds its own, such as its handler function.
        "args": {k: getattr(args, k) for k in sorted(train_option_names())},
        "world_size": world_size,
        "dataset": dataset,
        "config": config_name,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }))


def check_resumable(saved: dict, current: dict, path: str) -> None:
    """Refuse a resume whose recipe would compute something else than the interrupted run."""
    differences = [
        f"{key}: {saved['args'].get(key)!r} -> {value!r}"
        for key, value in current["args"].items()
        if key not in RESUME_FREE_ARGS and saved["args"].get(key) != value
    ]
    if saved["world_size"] != current["world_size"]:
        differences.append(f"world size: {saved['world_size']} -> {current['world_size']}")
    if differences:
        raise ValueError(
            f"cannot resume {path}: the recipe differs from the interrupted run's ({'; '.join(differences)})"
        )


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, read with weights_only=True (tensors and plain containers only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} does not exist (run without --resume first)")
    state = load_weights_only(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} training checkpoint")
    return state


def numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def rank_state(augment_generator: torch.Generator, device: torch.device, sums: dict) -> dict:
    """Everything that differs between ranks: random states and the running sums of the epoch so far."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "augment": augment_generator.get_state(),
        "numpy": numpy_state(),
        "sums": {k: v.cpu().clone() for k, v in sums.items()},
    }


def restore_rank_state(state: dict, augment_generator: torch.Generator, device: torch.device) -> dict:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    augment_generator.set_state(state["augment"])
    set_numpy_state(state["numpy"])
    return {k: v.to(device) for k, v in state["sums"].items()}


def new_sums(num_exits: int, device: torch.device) -> dict:
    return {"loss": torch.zeros((), dtype=torch.float64, device=device),
            "correct": torch.zeros(num_exits, dtype=torch.int64, device=device),
            "seen": torch.zeros((), dtype=torch.int64, device=device)}
