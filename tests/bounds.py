"""Assertions over the one error model (dvt_shared.error_bounds): no test states its own fp32 tolerance."""
from __future__ import annotations

import numpy as np

from dvt_shared.error_bounds import FP32, ErrorModel


def assert_close(got, want, blocks: int, model: ErrorModel = FP32, label: str = "") -> float:
    """|got - want| within `model`'s bound for outputs of `blocks` blocks, scaled by `want`; returns the
    factor this comparison needed (printed, so that a run shows how close to the bound it came)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{label}: shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max()) if want.size else 0.0
    delta = float(np.abs(got - want).max()) if want.size else 0.0
    bound = model.bound(blocks, scale)
    units = model.units(delta, blocks, scale)
    print(f"{label or 'outputs'}: max |d| {delta:.2e}, bound {bound:.2e} ({model.name}, {blocks} blocks, "
          f"scale {scale:.3g}), factor needed {units:.2f} of {model.factor:g}")
    assert delta <= bound, (
        f"{label or 'outputs'}: max |difference| {delta:.3e} > {bound:.3e} = {model.name} bound "
        f"({model.factor:g} u sqrt({blocks}) max(1, {scale:.3g}))"
    )
    return units


def assert_exits_close(got, want, depth: int, model: ErrorModel = FP32, label: str = "exit") -> None:
    """Per-exit logits of a cascade whose stages have `depth` blocks: exit k is held to depth * (k + 1)."""
    assert len(got) == len(want), f"{len(got)} exits != {len(want)}"
    for k, (ours, theirs) in enumerate(zip(got, want)):
        assert_close(ours, theirs, depth * (k + 1), model, f"{label} {k}")


def assert_chosen_close(got, want, exit_index, depth: int, model: ErrorModel = FP32, label: str = "logits") -> None:
    """Logits of the exit each sample left at (an engine's output): each sample's row held to its exit's bound."""
    exit_index = np.asarray(exit_index)
    for k in np.unique(exit_index):
        rows = exit_index == k
        assert_close(np.asarray(got)[rows], np.asarray(want)[rows], depth * (int(k) + 1), model, f"{label}, exit {k}")
