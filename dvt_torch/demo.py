"""The main job until trained weights ship: build dvt_t2t_vit_12 on CPU, print its per-exit
GFLOPs, run a forward pass, and check the release fixtures when they are present."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dvt_shared import config_from_release_json
from dvt_shared.flops import exit_gflops, stage_flops

from .dvt import DVT
from .models import create_model

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "release"


def check_release_fixtures() -> None:
    for family in ("t2t", "deit"):
        config_file = REFERENCE / f"{family}_mini_config.json"
        if not config_file.exists():
            print(f"release fixture {family}_mini not found under {REFERENCE}: skipped")
            continue
        model = DVT(config_from_release_json(json.loads(config_file.read_text()), f"{family}_mini")).eval()
        weights = np.load(REFERENCE / f"{family}_mini_weights.npz")
        model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files}, strict=True)
        io = np.load(REFERENCE / f"{family}_mini_io.npz")
        with torch.inference_mode():
            outputs = model.forward_exits(torch.from_numpy(io["images"]))
        deltas = [float(np.abs(o.numpy() - io[f"exit{k}"]).max()) for k, o in enumerate(outputs)]
        print(f"release fixture {family}_mini: max |logit - release logit| per exit = "
              + ", ".join(f"{d:.1e}" for d in deltas))


def main() -> None:
    torch.manual_seed(0)
    model = create_model("dvt_t2t_vit_12").eval()
    config = model.config
    print(f"{config.name}: {config.description}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M (random weights: no trained ImageNet checkpoint ships)")
    print(f"{'exit':>4} {'tokens':>7} {'stage GFLOPs':>13} {'cumulative GFLOPs':>18}")
    for k, (grid, stage, total) in enumerate(zip(config.grids, stage_flops(config), exit_gflops(config))):
        print(f"{k:>4} {f'{grid}x{grid}':>7} {stage / 1e9:>13.3f} {total:>18.3f}")
    x = torch.randn(2, config.in_chans, config.img_size, config.img_size)
    with torch.inference_mode():
        start = time.perf_counter()
        outputs = model.forward_exits(x)
        elapsed = time.perf_counter() - start
    print(f"forward pass, batch 2, CPU: {elapsed * 1000:.0f} ms; logits per exit: {[tuple(o.shape) for o in outputs]}")
    check_release_fixtures()


if __name__ == "__main__":
    main()
