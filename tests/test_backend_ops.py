"""Cases that hold for both backends, written once against a NumPy reference (einops style)."""
import numpy as np
import pytest

from dvt_shared import relation_resample_matrix, resample_matrix, resample_matrix_1d


class Torch:
    name = "torch"

    def __init__(self):
        import torch

        from dvt_torch import layers

        self.torch, self.layers = torch, layers

    def tensor(self, array):
        return self.torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def numpy(self, tensor):
        return tensor.detach().numpy()


class MindSpore:
    name = "mindspore"

    def __init__(self):
        import mindspore as ms

        from dvt_mindspore import layers

        self.ms, self.layers = ms, layers

    def tensor(self, array):
        return self.ms.Tensor(np.ascontiguousarray(array, dtype=np.float32))

    def numpy(self, tensor):
        return tensor.asnumpy()


@pytest.fixture(params=[Torch, MindSpore], ids=["torch", "mindspore"], scope="module")
def backend(request):
    return request.param()


PAIRS = [(7, 10), (10, 14), (3, 5), (5, 7), (4, 4)]


@pytest.mark.parametrize("src,dst", PAIRS)
def test_resample_grid(backend, src, dst):
    x = np.random.default_rng(0).standard_normal((2, 3, src, src))
    expected = (x.reshape(2, 3, src * src) @ resample_matrix(src, dst).T).reshape(2, 3, dst, dst)
    matrix_t = backend.tensor(resample_matrix_1d(src, dst).T)
    got = backend.numpy(backend.layers.resample_grid(backend.tensor(x), matrix_t))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("src,dst", PAIRS)
def test_resample_relations(backend, src, dst):
    tokens = src * src + 1
    relations = np.random.default_rng(1).standard_normal((2, 4, tokens, tokens))
    e = relation_resample_matrix(src, dst)
    expected = e @ relations @ e.T
    matrix_t = backend.tensor(resample_matrix_1d(src, dst).T)
    got = backend.numpy(backend.layers.resample_relations(backend.tensor(relations), matrix_t))
    assert got.shape == (2, 4, dst * dst + 1, dst * dst + 1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
