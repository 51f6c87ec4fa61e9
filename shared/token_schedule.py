"""Token grids of the exits and the fixed linear maps between them.

The release moves features and relations from an s x s grid to a t x t grid by nearest
upsampling to 2s x 2s followed by adaptive average pooling to t x t. Both steps are
linear and separable, so the whole move is one (t*t, s*s) matrix that every backend
applies the same way.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .configs import DVTConfig


def token_grids(config: DVTConfig) -> tuple[int, ...]:
    """Side of the token grid at every exit, fewest tokens first."""
    return config.grids


def nearest_matrix_1d(src: int, dst: int) -> np.ndarray:
    """(dst, src) map of nearest-neighbour resizing (PyTorch's 'nearest': floor(i * src / dst))."""
    _check_sizes(src, dst)
    index = np.minimum(np.floor(np.arange(dst) * (src / dst)).astype(np.int64), src - 1)
    out = np.zeros((dst, src))
    out[np.arange(dst), index] = 1.0
    return out


def adaptive_pool_matrix_1d(src: int, dst: int) -> np.ndarray:
    """(dst, src) map of adaptive average pooling: bin i covers [floor(i*src/dst), ceil((i+1)*src/dst))."""
    _check_sizes(src, dst)
    out = np.zeros((dst, src))
    for i in range(dst):
        start = (i * src) // dst
        end = -((-(i + 1) * src) // dst)
        out[i, start:end] = 1.0 / (end - start)
    return out


@lru_cache(maxsize=None)
def _resample_matrix_1d(src: int, dst: int) -> np.ndarray:
    out = adaptive_pool_matrix_1d(2 * src, dst) @ nearest_matrix_1d(src, 2 * src)
    out.setflags(write=False)
    return out


def resample_matrix_1d(src: int, dst: int) -> np.ndarray:
    """(dst, src) map along one axis: nearest to 2*src, then adaptive average pool to dst."""
    return _resample_matrix_1d(src, dst)


@lru_cache(maxsize=None)
def _resample_matrix(src: int, dst: int) -> np.ndarray:
    one_axis = _resample_matrix_1d(src, dst)
    out = np.kron(one_axis, one_axis)  # row-major flattening of the grid
    out.setflags(write=False)
    return out


def resample_matrix(src: int, dst: int) -> np.ndarray:
    """(dst*dst, src*src) map of flattened s x s token grids to flattened t x t grids."""
    return _resample_matrix(src, dst)


@lru_cache(maxsize=None)
def _relation_resample_matrix(src: int, dst: int) -> np.ndarray:
    grid = _resample_matrix(src, dst)
    out = np.zeros((dst * dst + 1, src * src + 1))
    out[0, 0] = 1.0
    out[1:, 1:] = grid
    out.setflags(write=False)
    return out


def relation_resample_matrix(src: int, dst: int) -> np.ndarray:
    """(t*t+1, s*s+1) map of a sequence with a leading class token.

    The class token is carried as it is; the grid tokens are resampled. Relations
    (query x key attention logits) move as E @ R @ E.T with E this matrix.
    """
    return _relation_resample_matrix(src, dst)


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The release's fixed sinusoid position table, (1, num_positions, dim) float32, computed in float64."""
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    angles = position / np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)[None]


def _check_sizes(src: int, dst: int) -> None:
    for label, value in (("source", src), ("target", dst)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{label} grid size must be a positive integer, got {value!r}")
