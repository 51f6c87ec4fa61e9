"""Fixed batch gears: the MindSpore engine runs compacted batches as gear-sized pieces.

Padded rows and split batches never change the real rows' results, each gear compiles once
per process, the
dynamic axis stays selectable, and `export_mindir` writes one graph per stage and gear that
`MindIRAdaptiveDVT` runs with the same results.
"""
import mindspore as ms
import numpy as np
import pytest

import dvt_mindspore
from dvt_mindspore.engine import AdaptiveDVT
from dvt_mindspore.export import MindIRAdaptiveDVT, export_mindir
from dvt_shared import get_model_config
from dvt_shared.adaptive import check_gears, even_chunks, gear_for, gear_pieces, power_of_two_gears
from tests.backends import adapter
from tests.bounds import assert_chosen_close

TINY = get_model_config("dvt_t2t_vit_fmnist", embed_dim=24, depth=1, num_heads=2, token_dim=8)
EVERY_EXIT = [1e8, 1e8, -1e8]  # nobody stops early: every stage sees the whole batch


def test_power_of_two_gears_cover_every_batch():
    assert power_of_two_gears(1) == (1,)
    assert power_of_two_gears(64) == (1, 2, 4, 8, 16, 32, 64)
    assert power_of_two_gears(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    gears = power_of_two_gears(100)
    assert all(b <= gear_for(b, gears) < 2 * b for b in range(1, 101))


@pytest.mark.parametrize("gears", [(1, 2, 4, 8, 16, 32, 64), (4, 8), (3, 5, 100)])
def test_gear_pieces_cover_the_batch_in_order(gears):
    for batch in range(1, gears[-1] + 1):
        pieces = gear_pieces(batch, gears)
        assert sum(rows for rows, _ in pieces) == batch
        assert all(gear in gears and rows <= gear for rows, gear in pieces)
        assert all(rows == gear for rows, gear in pieces[:-1])  # only the last piece is padded
        padding = pieces[-1][1] - pieces[-1][0]
        assert padding <= gear_for(batch, gears) - batch  # never more padding than padding alone


def test_gear_pieces_split_when_padding_wastes_more():
    gears = power_of_two_gears(64)
    assert gear_pieces(17, gears) == [(16, 16), (1, 1)]  # not 15 padded rows at gear 32
    assert gear_pieces(28, gears) == [(28, 32)]  # 4 padded rows beat 12 left over after 16
    assert gear_pieces(20, gears) == [(16, 16), (4, 4)]
    assert gear_pieces(5, (4, 8)) == [(4, 4), (1, 4)]


@pytest.mark.parametrize("n, max_batch", [(1, 1), (7, 3), (256, 256), (257, 256), (10000, 256)])
def test_even_chunks_are_the_fewest_and_as_even_as_can_be(n, max_batch):
    chunks = even_chunks(n, max_batch)
    sizes = [stop - start for start, stop in chunks]
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in zip(chunks, chunks[1:]))  # contiguous, in order
    assert len(chunks) == -(-n // max_batch) and max(sizes) <= max_batch and max(sizes) - min(sizes) <= 1


def test_even_chunks_leave_no_odd_tail():
    assert {stop - start for start, stop in even_chunks(10000, 256)} == {250}  # one gear (256), not 256 and 16
    with pytest.raises(ValueError, match="n >= 1"):
        even_chunks(0, 256)


@pytest.mark.parametrize("gears", [[], [0, 4], [2.5], ["x"], [True, 8]])
def test_bad_gears_are_refused(gears):
    with pytest.raises(ValueError, match="gears"):
        check_gears(gears, 4)


def test_gears_must_hold_max_batch():
    with pytest.raises(ValueError, match="largest gear, 8, is below max_batch 16"):
        check_gears([4, 8], 16)
    with pytest.raises(ValueError, match="gears must be"):
        AdaptiveDVT(dvt_mindspore.DVT(TINY), [0.5, 0.5, 0.5], gears="fast")


@pytest.fixture(scope="module")
def model():
    ms.set_seed(0)
    return dvt_mindspore.DVT(TINY)


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def on_gear_of_eight(model, thresholds):
    """An engine on one gear of 8 over `model`; the tests' engines share its stage graphs (tests/backends.py),
    so each stage compiles that gear once."""
    return adapter("mindspore").engine(model, thresholds, max_batch=8, gears=[8])


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 28, 28)).astype(np.float32)


def test_padding_never_changes_the_real_rows(model, graph_mode):
    """5 images padded to gear 8 with copies of the first, against the same 5 beside 3 other images."""
    engine = on_gear_of_eight(model, EVERY_EXIT)
    real, others = images(5, seed=1), images(3, seed=2) * 3.0
    padded = engine.predict(ms.Tensor(real))
    beside_others = engine.predict(ms.Tensor(np.concatenate([real, others])))
    np.testing.assert_array_equal(padded.logits, beside_others.logits[:5])
    np.testing.assert_array_equal(padded.confidence, beside_others.confidence[:5])


def test_split_batches_agree_with_one_gear(model, graph_mode):
    """5 images as gears 4 + 1 (and their reuse state put back together) against one gear of 8,
    with thresholds that send some images on: real compaction between split stages."""
    x = ms.Tensor(images(5, seed=5))
    first_exit = on_gear_of_eight(model, [-1e8] * 3).predict(x)  # everyone stops at exit 0
    # halfway between two images' confidences: no image lies within rounding of it
    middle = float(np.sort(first_exit.confidence)[2:4].mean())
    thresholds = [middle, middle, -1e8]
    split = AdaptiveDVT(model, thresholds, max_batch=8, gears=[1, 2, 4, 8])
    assert gear_pieces(5, split.gears) == [(4, 4), (1, 1)]
    got, expected = split.predict(x), on_gear_of_eight(model, thresholds).predict(x)
    assert 0 < (got.exit_index > 0).sum() < 5
    np.testing.assert_array_equal(got.exit_index, expected.exit_index)
    assert_chosen_close(got.logits, expected.logits, got.exit_index, TINY.depth)


@pytest.mark.slow
def test_each_gear_compiles_once(model, graph_mode):
    engine = AdaptiveDVT(model, EVERY_EXIT, max_batch=4, gears="powers-of-two")
    for count in (3, 1, 4):  # gears 4, 1, 4
        engine.predict(ms.Tensor(images(count, seed=count)))
    assert engine.compiled_shapes() == [2, 2, 2]
    for count in (2, 1, 3):  # gear 2 is new, 1 and 4 are compiled
        engine.predict(ms.Tensor(images(count, seed=count)))
    assert engine.compiled_shapes() == [3, 3, 3]


def test_dynamic_axis_compiles_once_and_agrees(model, graph_mode):
    x = images(7, seed=3)
    dynamic = AdaptiveDVT(model, EVERY_EXIT, max_batch=8, gears="dynamic")
    got = [dynamic.predict(ms.Tensor(x[:count])) for count in (7, 3, 1)]
    assert dynamic.compiled_shapes() == [1, 1, 1]
    geared = on_gear_of_eight(model, EVERY_EXIT).predict(ms.Tensor(x))
    assert_chosen_close(got[0].logits, geared.logits, geared.exit_index, TINY.depth)


def test_mindir_gears_run_like_the_engine(model, graph_mode, tmp_path):
    export_mindir(model, tmp_path, gears=[8])
    assert sorted(p.name for p in tmp_path.glob("*.mindir")) == [f"stage{k}_b8.mindir" for k in range(3)]
    x = ms.Tensor(images(13, seed=4))  # chunks of 7 and 6, each padded to 8
    # half-way between two images' first-exit confidences: about half of them go on, none within rounding
    first_exit = np.sort(on_gear_of_eight(model, [-1e8] * 3).predict(x).confidence)
    middle = float(first_exit[6:8].mean())
    thresholds = [middle, middle, -1e8]
    served = MindIRAdaptiveDVT(tmp_path, thresholds)
    assert served.max_batch == 8
    got = served.predict(x)
    expected = on_gear_of_eight(model, thresholds).predict(x)
    assert 0 < (got.exit_index > 0).sum() < 13
    np.testing.assert_array_equal(got.exit_index, expected.exit_index)
    assert_chosen_close(got.logits, expected.logits, got.exit_index, TINY.depth)
    # every gear's graph is held to its sha256 in the manifest
    (tmp_path / "stage1_b8.mindir").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="stage1_b8.mindir: sha256 .* does not match dvt_mindir.json's"):
        MindIRAdaptiveDVT(tmp_path, thresholds)
