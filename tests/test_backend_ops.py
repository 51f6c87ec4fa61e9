"""Cases that hold for both backends, written once against a NumPy reference (einops style).

They run in float64, where a correct layer equals the reference to rounding (1e-12), on any CPU."""
import numpy as np
import pytest

from dvt_shared import relation_resample_matrix, resample_matrix, resample_matrix_1d


def tensor(backend, array):
    return backend.tensor(np.asarray(array, np.float64))


PAIRS = [(7, 10), (10, 14), (3, 5), (5, 7), (4, 4)]


def resample_features(backend, maps: np.ndarray, matrix_t):
    """(B, C, s, s) reused-feature maps moved to the next grid as the backend's blocks move them:
    PyTorch's as (B, s*s, C) tokens (resample_tokens), MindSpore's as the maps (resample_grid)."""
    batch, channels, src, _ = maps.shape
    dst = matrix_t.shape[1]
    if backend.name == "mindspore":
        return backend.numpy(backend.layers.resample_grid(tensor(backend, maps), matrix_t))
    tokens = maps.reshape(batch, channels, src * src).transpose(0, 2, 1)
    moved = backend.numpy(backend.layers.resample_tokens(tensor(backend, tokens), matrix_t))
    return moved.transpose(0, 2, 1).reshape(batch, channels, dst, dst)


@pytest.mark.parametrize("src,dst", PAIRS)
def test_resample_features(backend, src, dst):
    x = np.random.default_rng(0).standard_normal((2, 3, src, src))
    expected = (x.reshape(2, 3, src * src) @ resample_matrix(src, dst).T).reshape(2, 3, dst, dst)
    matrix_t = tensor(backend, resample_matrix_1d(src, dst).T)
    np.testing.assert_allclose(resample_features(backend, x, matrix_t), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("src,dst", PAIRS)
def test_resample_relations(backend, src, dst):
    tokens = src * src + 1
    relations = np.random.default_rng(1).standard_normal((2, 4, tokens, tokens))
    e = relation_resample_matrix(src, dst)
    expected = e @ relations @ e.T
    matrix_t = tensor(backend, resample_matrix_1d(src, dst).T)
    got = backend.numpy(backend.layers.resample_relations(tensor(backend, relations), matrix_t))
    assert got.shape == (2, 4, dst * dst + 1, dst * dst + 1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
