import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvt_shared import (
    get_model_config,
    list_model_names,
    relation_resample_matrix,
    resample_matrix,
    resample_matrix_1d,
    token_grids,
)

PAIRS = [(7, 10), (10, 14), (3, 5), (5, 7), (4, 4), (6, 13), (9, 7), (1, 3)]


def two_step_reference(grid: np.ndarray, dst: int) -> np.ndarray:
    """The release's rule on a (C, s, s) grid: nearest to 2s, adaptive average pool to dst."""
    x = torch.from_numpy(grid)[None]
    src = grid.shape[-1]
    x = F.interpolate(x, size=(2 * src, 2 * src), mode="nearest")
    return F.adaptive_avg_pool2d(x, (dst, dst))[0].numpy()


@pytest.mark.parametrize("src,dst", PAIRS)
def test_resample_matrix_equals_nearest_then_adaptive_pool(src, dst):
    grid = np.random.default_rng(src * 100 + dst).normal(size=(5, src, src))
    expected = two_step_reference(grid, dst).reshape(5, dst * dst)
    got = grid.reshape(5, src * src) @ resample_matrix(src, dst).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("src,dst", PAIRS)
def test_rows_sum_to_one_and_are_separable(src, dst):
    matrix = resample_matrix(src, dst)
    assert matrix.shape == (dst * dst, src * src)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    one_axis = resample_matrix_1d(src, dst)
    np.testing.assert_array_equal(matrix, np.kron(one_axis, one_axis))


def test_relation_matrix_keeps_class_token():
    matrix = relation_resample_matrix(7, 10)
    assert matrix.shape == (101, 50)
    assert matrix[0, 0] == 1.0 and not matrix[0, 1:].any() and not matrix[1:, 0].any()
    np.testing.assert_array_equal(matrix[1:, 1:], resample_matrix(7, 10))


def test_release_schedule_7_10_14():
    for name in ("dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small"):
        assert token_grids(get_model_config(name)) == (7, 10, 14)


def test_grids_follow_image_size():
    assert get_model_config("dvt_t2t_vit_12", img_size=160).grids == (5, 7, 10)
    assert get_model_config("dvt_t2t_vit_fmnist").grids == (3, 5, 7)


def test_matrices_are_read_only():
    with pytest.raises(ValueError):
        resample_matrix(7, 10)[0, 0] = 2.0


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_sizes_rejected(bad):
    with pytest.raises(ValueError, match="grid size"):
        resample_matrix_1d(bad, 4)


def test_every_registered_config_builds_a_schedule():
    for name in list_model_names(cascade=True):
        config = get_model_config(name)
        grids = token_grids(config)
        assert len(grids) == config.num_exits and list(grids) == sorted(grids)


def test_sinusoid_table_is_the_release_formula():
    from dvt_shared.token_schedule import sinusoid_table

    table = sinusoid_table(50, 64)
    assert table.shape == (1, 50, 64) and table.dtype == np.float32
    # the release's own per-element formula
    expected = np.array([[pos / np.power(10000, 2 * (j // 2) / 64) for j in range(64)] for pos in range(50)])
    expected[:, 0::2] = np.sin(expected[:, 0::2])
    expected[:, 1::2] = np.cos(expected[:, 1::2])
    np.testing.assert_array_equal(table[0], expected.astype(np.float32))
