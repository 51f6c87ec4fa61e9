"""Properties of dvt_shared that must hold for any input, checked on random ones (hypothesis).

Resampling matrices against a literal NumPy transcription of the release's two-step rule,
exit shares against the counts they request, budgets against the cost they buy, and weight
conversion between the frameworks on random tiny configs. Example counts are kept small:
the whole file runs in well under a minute.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dvt_mindspore
import dvt_torch
from dvt_mindspore import checkpoint as ms_checkpoint
from dvt_mindspore import convert as ms_convert
from dvt_shared import (
    DVTConfig,
    StageSpec,
    StemSpec,
    dynamic_evaluate,
    exit_shares,
    find_thresholds,
    get_model_config,
    relation_resample_matrix,
    resample_matrix,
    softmax,
    thresholds_for_budget,
)
from dvt_shared.weight_format import WeightMetadata, load_canonical, save_canonical
from dvt_torch import convert as torch_convert

FEW = settings(max_examples=30, deadline=None)


# --- resampling between token grids ------------------------------------------------------

def two_step_reference(grid: np.ndarray, dst: int) -> np.ndarray:
    """The release's rule on a (C, s, s) grid, loop by loop: nearest-neighbour upsampling to
    2s x 2s (pixel i copies floor(i / 2)), then adaptive average pooling to dst x dst (bin i
    covers [floor(i * 2s / dst), ceil((i + 1) * 2s / dst)) on each axis)."""
    src = grid.shape[-1]
    size = 2 * src
    nearest = np.arange(size) // 2
    upsampled = grid[:, nearest][:, :, nearest]
    out = np.empty((grid.shape[0], dst, dst))
    for i in range(dst):
        top, bottom = (i * size) // dst, -((-(i + 1) * size) // dst)
        for j in range(dst):
            left, right = (j * size) // dst, -((-(j + 1) * size) // dst)
            out[:, i, j] = upsampled[:, top:bottom, left:right].mean(axis=(1, 2))
    return out


@FEW
@given(src=st.integers(1, 16), dst=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_resampling_matches_the_two_step_rule(src, dst, seed):
    grid = np.random.default_rng(seed).normal(size=(3, src, src))
    got = grid.reshape(3, src * src) @ resample_matrix(src, dst).T
    np.testing.assert_allclose(got, two_step_reference(grid, dst).reshape(3, dst * dst), rtol=0, atol=1e-12)


@FEW
@given(src=st.integers(1, 16), dst=st.integers(1, 20), value=st.floats(-1e3, 1e3))
def test_resampling_keeps_constants(src, dst, value):
    for matrix in (resample_matrix(src, dst), relation_resample_matrix(src, dst)):
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        assert (matrix >= 0).all()
        np.testing.assert_allclose(matrix @ np.full(matrix.shape[1], value), value, rtol=1e-12, atol=1e-12)


# --- exit policy --------------------------------------------------------------------------

def distinct_confidences(rng: np.random.Generator, n_exits: int, n: int) -> np.ndarray:
    """(n_exits, n) float32 confidences in [0.5, 1), all different within an exit: no ties."""
    return np.stack([0.5 + 0.5 * rng.permutation(n) / n for _ in range(n_exits)]).astype(np.float32)


def two_class_probs(conf: np.ndarray) -> np.ndarray:
    return np.stack([conf, 1 - conf], axis=-1)


@FEW
@given(
    n_exits=st.integers(2, 4),
    n=st.integers(2, 300),
    p=st.one_of(st.none(), st.floats(0.05, 3.0)),
    weights=st.lists(st.integers(0, 10), min_size=4, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_exit_shares_reproduce_the_requested_counts(n_exits, n, p, weights, seed):
    """Without ties, floor(n * share) of the samples still present leave at every exit but
    the last (none if that is more than are present), and the last takes the rest; for the
    release's geometric shares (p) and for any others (weights)."""
    if p is not None:
        shares = exit_shares(p, n_exits)
    else:
        weights = np.asarray(weights[:n_exits], dtype=np.float64)
        weights[-1] += 1.0  # never all zero
        shares = weights / weights.sum()
    probs = two_class_probs(distinct_confidences(np.random.default_rng(seed), n_exits, n))
    thresholds = find_thresholds(probs, shares)
    counts = dynamic_evaluate(probs, np.zeros(n, dtype=int), np.arange(1, n_exits + 1), thresholds).exit_counts
    remaining, expected = n, []
    for share in shares[:-1]:
        # the release multiplies in float32
        requested = int(np.floor(np.float32(n) * np.float32(share)))
        leaving = requested if requested <= remaining else 0
        expected.append(leaving)
        remaining -= leaving
    np.testing.assert_array_equal(counts, expected + [remaining])


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 120),
    classes=st.integers(2, 5),
    costs=st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
# Cumulative costs that sum to just under the budget 11.0 the last fraction asks for.
@example(n=2, classes=2, costs=[1.9999999999999991, 3.999999999999999, 5.0], fractions=[0.0, 0.5, 1.0], seed=0)
def test_a_larger_budget_never_buys_less(n, classes, costs, fractions, seed):
    probs = softmax(np.random.default_rng(seed).normal(scale=2.0, size=(3, n, classes)).astype(np.float32))
    flops = np.cumsum(costs)
    targets = np.zeros(n, dtype=int)
    spent = []
    for budget in sorted(flops[0] + f * (flops[-1] - flops[0]) for f in fractions):
        cost = dynamic_evaluate(probs, targets, flops, thresholds_for_budget(probs, flops, budget)).expected_flops
        assert cost <= budget + 1e-9
        spent.append(cost)
    assert spent == sorted(spent), spent


# --- weight conversion ----------------------------------------------------------------------

FMNIST_STAGES = get_model_config("dvt_t2t_vit_fmnist").stages
PATCH_STAGES = tuple(
    StageSpec(name, StemSpec("patch", ((patch, patch, 0),)))
    for name, patch in zip(("less_less_token", "less_token", "normal_token"), (14, 7, 4))
)


@st.composite
def tiny_configs(draw) -> DVTConfig:
    stem = draw(st.sampled_from(["t2t", "patch"]))
    exits = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 2))
    return DVTConfig(
        name="random_tiny", family="t2t_vit" if stem == "t2t" else "deit",
        stages=(FMNIST_STAGES if stem == "t2t" else PATCH_STAGES)[3 - exits:],
        embed_dim=heads * draw(st.sampled_from([4, 8])), depth=draw(st.integers(1, 2)), num_heads=heads,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0])), qkv_bias=draw(st.booleans()), layernorm_eps=1e-6,
        pos_embed=draw(st.sampled_from(["sinusoid", "learned"])), img_size=28, in_chans=draw(st.integers(1, 3)),
        num_classes=draw(st.integers(2, 7)), token_dim=draw(st.sampled_from([4, 8])),
        reuse=draw(st.sampled_from(["none", "feature", "relation", "both"])),
        reuse_dim=draw(st.sampled_from([4, 8])), reuse_hidden=8,
    )


@settings(max_examples=12, deadline=None)
@given(config=tiny_configs(), seed=st.integers(0, 2**31 - 1))
def test_conversion_round_trip_is_bit_exact(tmp_path_factory, config, seed):
    """torch -> canonical -> MindSpore -> canonical -> torch gives back every bit, in memory
    and through the files (canonical .safetensors, MindSpore .ckpt)."""
    torch.manual_seed(seed)
    source = dvt_torch.DVT(config)
    with torch.no_grad():
        for param in source.parameters():
            param.copy_(torch.randn(param.shape))  # every bit pattern matters, not only the initial ones
    canonical = torch_convert.to_canonical(source)
    twin = ms_convert.from_canonical(dvt_mindspore.DVT(config), canonical)
    in_memory = torch_convert.from_canonical(dvt_torch.DVT(config), ms_convert.to_canonical(twin))

    folder = tmp_path_factory.mktemp("round_trip")
    save_canonical(folder / "w.safetensors", canonical, WeightMetadata(config=config))
    tensors, metadata = load_canonical(folder / "w.safetensors")
    assert metadata.config == config
    ms_checkpoint.save_ckpt(ms_convert.from_canonical(dvt_mindspore.DVT(config), tensors), folder / "w.ckpt")
    through_files = torch_convert.from_canonical(dvt_torch.DVT(config), ms_checkpoint.load_ckpt(folder / "w.ckpt"))

    original = source.state_dict()
    for back in (in_memory, through_files):
        returned = back.state_dict()
        assert list(returned) == list(original)
        for key, value in original.items():
            assert returned[key].dtype == value.dtype, key
            assert returned[key].numpy().tobytes() == value.numpy().tobytes(), key
