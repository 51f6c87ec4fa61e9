"""Building blocks of a DVT stage in MindSpore, laid out so parameter names follow the release's keys.

Attribute names equal the PyTorch module names; the only naming difference left is
MindSpore's LayerNorm, whose parameters are `gamma`/`beta` (mapped in `convert.py`).
"""
from __future__ import annotations

import math
import time

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Orthogonal, TruncatedNormal, initializer

from dvt_shared.configs import DVTConfig


def dense(in_features: int, out_features: int, has_bias: bool = True) -> nn.Dense:
    """A Linear with the release's initialisation: truncated normal (std 0.02) weight, zero bias."""
    return nn.Dense(
        in_features, out_features, weight_init=TruncatedNormal(sigma=0.02), bias_init="zeros", has_bias=has_bias,
    )


# The BatchMatMul primitive, and plain 2-D MatMul for "tokens times a matrix": on CPU the generic
# ops.matmul (MatMulExt) runs 2-5x slower than these, most of all with a dynamic batch axis,
# which is how the early-exit engine compiles every stage.
_batch_matmul = ops.BatchMatMul()
_batch_matmul_bt = ops.BatchMatMul(transpose_b=True)


def batch_matmul(a, b, transpose_b: bool = False):
    """a @ b (or a @ b^T) over equal leading batch axes."""
    return _batch_matmul_bt(a, b) if transpose_b else _batch_matmul(a, b)


def matmul_last(x, matrix):
    """x @ matrix for any leading axes of x, as one 2-D product."""
    return ops.matmul(x.reshape(-1, x.shape[-1]), matrix).reshape(x.shape[:-1] + (matrix.shape[1],))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis (parameters `gamma`, `beta`), with the release's epsilon.

    The CPU kernel computes float64 input at float32 precision (2.9e-8 relative error, against 2e-16
    for the ops composed here), so float64 input is normalised with plain ops: the float64 run that
    proves the port equal to the release must not round anywhere to float32.
    """

    def __init__(self, dim: int, eps: float):
        # MindSpore's default epsilon is 1e-7; the release's norms use the config's.
        super().__init__((dim,), begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.eps_float64 = Tensor(eps, ms.float64)

    def construct(self, x):
        if x.dtype != ms.float64:
            return super().construct(x)
        centred = x - x.mean(axis=-1, keep_dims=True)
        variance = (centred * centred).mean(axis=-1, keep_dims=True)
        return centred / ops.sqrt(variance + self.eps_float64) * self.gamma + self.beta


def layer_norm(dim: int, eps: float) -> LayerNorm:
    return LayerNorm(dim, eps)


def gelu() -> nn.GELU:
    # MindSpore defaults to the tanh approximation; the release uses the exact (erf) GELU.
    return nn.GELU(approximate=False)


class DropPath(nn.Cell):
    """Stochastic depth: in training, drop a sample's whole residual branch with probability `rate`."""

    def __init__(self, rate: float):
        super().__init__()
        self.keep = 1.0 - rate

    def construct(self, x):
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (ops.rand(shape, dtype=x.dtype) < self.keep).astype(x.dtype)
        return x / self.keep * mask


class Mlp(nn.Cell):
    """timm's Mlp (fc1, GELU, dropout, fc2, dropout) under timm's attribute names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, drop: float):
        super().__init__()
        self.fc1 = dense(in_features, hidden_features)
        self.act = gelu()
        self.drop1 = nn.Dropout(p=drop)
        self.fc2 = dense(hidden_features, out_features)
        self.drop2 = nn.Dropout(p=drop)

    def construct(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TokenPerformer(nn.Cell):
    """Performer token mixer of the T2T stem (linear attention with positive random features).

    `w` is a fixed orthogonal random projection saved with the weights; `v` is the skip path.
    """

    def __init__(self, dim: int, emb: int, kernel_ratio: float, eps: float, norm_eps: float, drop: float):
        super().__init__()
        self.emb = emb
        self.m = int(emb * kernel_ratio)
        self.eps = eps
        self.kqv = dense(dim, 3 * emb)
        self.dp = nn.Dropout(p=drop)
        self.proj = dense(emb, emb)
        self.norm1 = layer_norm(dim, norm_eps)
        self.norm2 = layer_norm(emb, norm_eps)
        self.mlp = nn.SequentialCell([dense(emb, emb), gelu(), dense(emb, emb), nn.Dropout(p=drop)])
        w = initializer(Orthogonal(), (self.m, emb), ms.float32).init_data().asnumpy() * math.sqrt(self.m)
        self.w = Parameter(Tensor(w.astype(np.float32)), name="w", requires_grad=False)
        # Python floats enter the graph as float32: float64 runs use these (see Attention)
        self.sqrt_m_float64 = Tensor(math.sqrt(self.m), ms.float64)
        self.eps_float64 = Tensor(eps, ms.float64)

    def prm_exp(self, x):
        # exp(w.x - |x|^2 / 2) / sqrt(m): positive random features of the softmax kernel
        xd = (x * x).sum(axis=-1, keepdims=True) / 2
        sqrt_m = self.sqrt_m_float64 if x.dtype == ms.float64 else math.sqrt(self.m)
        return ops.exp(matmul_last(x, self.w.swapaxes(0, 1)) - xd) / sqrt_m

    def construct(self, x):
        x = self.norm1(x)
        k, q, v = ops.split(self.kqv(x), self.emb, axis=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        normaliser = batch_matmul(qp, kp.sum(axis=1).expand_dims(-1))
        kptv = batch_matmul(v.swapaxes(1, 2), kp)
        eps = self.eps_float64 if x.dtype == ms.float64 else self.eps
        y = batch_matmul(qp, kptv, transpose_b=True) / (normaliser + eps)
        x = v + self.dp(self.proj(y))
        return x + self.mlp(self.norm2(x))


class T2TStem(nn.Cell):
    """Tokens-to-Token stem: soft split (unfold), performer, reshape to a grid, repeat; then project."""

    def __init__(self, config: DVTConfig, index: int):
        super().__init__()
        stem = config.stages[index].stem
        self.sizes = stem.sizes(config.img_size)
        self.splits = tuple(tuple(split) for split in stem.splits)
        in_dims = config.stem_widths(index)
        for i, dim in enumerate(in_dims[:-1], start=1):
            performer = TokenPerformer(
                dim, config.token_dim, config.performer_kernel_ratio, config.performer_eps,
                config.stem_layernorm_eps, config.stem_drop_rate,
            )
            setattr(self, f"attention{i}", performer)
        self.project = dense(in_dims[-1], config.embed_dim)

    def construct(self, x):
        kernel, stride, padding = self.splits[0]
        x = ops.unfold(x, kernel, padding=padding, stride=stride).swapaxes(1, 2)
        for i in range(1, len(self.splits)):
            x = getattr(self, f"attention{i}")(x)
            size = self.sizes[i - 1]
            x = x.swapaxes(1, 2).reshape(x.shape[0], x.shape[2], size, size)
            kernel, stride, padding = self.splits[i]
            x = ops.unfold(x, kernel, padding=padding, stride=stride).swapaxes(1, 2)
        return self.project(x)


class PatchEmbed(nn.Cell):
    """Strided convolution to tokens; it takes a padding (the release's 10x10 DeiT stem)."""

    def __init__(self, config: DVTConfig, index: int):
        super().__init__()
        kernel, stride, padding = config.stages[index].stem.splits[0]
        self.proj = UnfoldConv2d(config.in_chans, config.embed_dim, kernel, stride, padding, bias=True)

    def construct(self, x):
        x = self.proj(x)
        return x.reshape(x.shape[0], x.shape[1], -1).swapaxes(1, 2)


class UnfoldConv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same names) computed as unfold + one batched matmul on CPU.

    MindSpore 2.10's CPU Conv2D hands oneDNN plain NCHW tensors, for which oneDNN runs a reference
    kernel when the kernel is larger than 1x1: about 1 GFLOP/s on the AMD Zen 5 it was measured on
    (a 3x3, 16-channel convolution of 8x28x28 maps took 25 ms, against 0.9 ms with oneDNN's gemm
    kernel), which made the Fashion-MNIST ResNet 6.6x and VT-ResNet 12x slower than this. 1x1
    convolutions keep the native kernel, and so does every convolution of a cell built while
    another device is the target. The CPU's Conv2D has no float64 kernel; this path has one.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, bias: bool, **kwargs):
        super().__init__(cin, cout, kernel, stride=stride, pad_mode="pad", padding=padding, has_bias=bias, **kwargs)
        self.unfolded = kernel > 1 and ms.get_context("device_target") == "CPU"

    def construct(self, x):
        if not self.unfolded:
            return super().construct(x)
        kernel, stride, padding = self.kernel_size[0], self.stride[0], self.padding
        batch, _, height, width = x.shape
        out_height = (height + 2 * padding - kernel) // stride + 1
        out_width = (width + 2 * padding - kernel) // stride + 1
        columns = ops.unfold(x, kernel, padding=padding, stride=stride)  # (B, C k k, out_height out_width)
        weight = self.weight.reshape(self.out_channels, -1)
        y = batch_matmul(ops.broadcast_to(weight, (batch,) + weight.shape), columns)
        if self.has_bias:
            y = y + self.bias.reshape(1, -1, 1)
        return y.reshape(batch, self.out_channels, out_height, out_width)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution (nn.Conv2d's parameters and names) computed as one batched matrix product over
    the pixels, as PyTorch's twin does; unlike Conv2D on CPU, it also runs in float64."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1, pad_mode="valid", has_bias=True)

    def construct(self, x):
        batch, _, height, width = x.shape
        weight = self.weight.reshape(self.out_channels, -1)
        y = batch_matmul(ops.broadcast_to(weight, (batch,) + weight.shape), x.reshape(batch, x.shape[1], -1))
        return (y + self.bias.reshape(1, -1, 1)).reshape(batch, self.out_channels, height, width)


class Attention(nn.Cell):
    """Multi-head self-attention that adds reused relations to its logits and returns them."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # a Python float enters the graph as float32 (1/sqrt(24) is not a float32 number): float64 runs
        # multiply by the float64 scale
        self.scale_float64 = Tensor(self.scale, ms.float64)
        self.qkv = dense(dim, dim * 3, has_bias=qkv_bias)
        self.attn_drop = nn.Dropout(p=attn_drop)
        self.proj = dense(dim, dim)
        self.proj_drop = nn.Dropout(p=proj_drop)

    def construct(self, x, relation_bias=None):
        batch, tokens, dim = x.shape
        # Split, not indexing: CPU StridedSlice copies element by element; with indexing here, for the
        # class token and the relation blocks it took 48.7 of the last stage's 111 ms at batch 64
        # (benchmarks/mindspore_ops.py --before ad1d0a4), 0.26 ms with splits.
        q, k, v = (
            ops.transpose(t.reshape(batch, tokens, self.num_heads, dim // self.num_heads), (0, 2, 1, 3))
            for t in ops.split(self.qkv(x), dim, axis=-1)
        )
        logits = batch_matmul(q, k, transpose_b=True) * (self.scale_float64 if x.dtype == ms.float64 else self.scale)
        if relation_bias is not None:
            logits = logits + relation_bias
        attn = self.attn_drop(ops.softmax(logits, axis=-1))
        x = batch_matmul(attn, v).swapaxes(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x)), logits


class Block(nn.Cell):
    """Transformer block; with feature reuse its MLP also reads the previous stage's tokens."""

    def __init__(self, config: DVTConfig, index: int, drop_path: float):
        super().__init__()
        dim, eps, mlp_in = config.embed_dim, config.layernorm_eps, config.mlp_in(index)
        feature_reuse = config.stage_reuses(index)[0]
        self.norm1 = layer_norm(dim, eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias, config.attn_drop_rate, config.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = layer_norm(mlp_in, eps)
        self.mlp = Mlp(mlp_in, config.mlp_hidden, dim, config.drop_rate)
        self.feature_reuse = feature_reuse
        if feature_reuse:
            # release key spelling: feature_resuse_mlp
            self.feature_resuse_mlp = nn.SequentialCell(
                [layer_norm(dim, eps), Mlp(dim, config.reuse_hidden, config.reuse_dim, config.drop_rate)]
            )

    def construct(self, x, reused_features=None, resample_t=None, relation_bias=None):
        y, logits = self.attn(self.norm1(x), relation_bias)
        x = x + self.drop_path(y)
        mlp_in = x
        if self.feature_reuse:
            reused = drop_class_token(self.feature_resuse_mlp(reused_features))
            batch, tokens, channels = reused.shape
            src, dst = resample_t.shape
            reused = resample_grid(reused.swapaxes(1, 2).reshape(batch, channels, src, src), resample_t)
            # a zero class-token row, concatenated: CPU PadV3 took 2-4 ms per stage here (mindspore_ops.py)
            zero_row = ops.zeros((batch, 1, channels), reused.dtype)
            reused = ops.cat((zero_row, reused.reshape(batch, channels, dst * dst).swapaxes(1, 2)), axis=1)
            mlp_in = ops.cat((x, reused), axis=2)
        return x + self.drop_path(self.mlp(self.norm2(mlp_in))), logits


def class_token(tokens):
    """(B, N, D) -> (B, D): the first token, by a split (see Attention)."""
    return ops.split(tokens, [1, tokens.shape[1] - 1], axis=1)[0].squeeze(1)


def drop_class_token(tokens):
    """(B, N, D) -> (B, N - 1, D): every token but the first."""
    return ops.split(tokens, [1, tokens.shape[1] - 1], axis=1)[1]


def resample_grid(x, resample_t):
    """(..., s, s) -> (..., t, t) with the (s, t) transposed one-axis map of dvt_shared, applied to both axes."""
    x = matmul_last(x, resample_t)
    return matmul_last(x.swapaxes(-1, -2), resample_t).swapaxes(-1, -2)


def resample_relations(relations, resample_t):
    """(B, C, s*s+1, s*s+1) query x key logits -> (B, C, t*t+1, t*t+1); class row and column carried along.

    Equal to E @ R @ E.T with E = dvt_shared.relation_resample_matrix, done axis by axis.
    """
    batch, channels, _, _ = relations.shape
    src, dst = resample_t.shape
    # splits rather than indexing (see Attention)
    top, rest = ops.split(relations, [1, src * src], axis=2)
    cls_cls, cls_row = ops.split(top, [1, src * src], axis=3)
    cls_col, grid = ops.split(rest, [1, src * src], axis=3)
    cls_row = resample_grid(cls_row.reshape(batch, channels, src, src), resample_t)
    cls_col = resample_grid(cls_col.reshape(batch, channels, src, src), resample_t)
    grid = grid.reshape(batch, channels, src * src, src, src)
    grid = resample_grid(grid, resample_t).reshape(batch, channels, src * src, dst * dst)  # keys moved
    grid = grid.swapaxes(2, 3).reshape(batch, channels, dst * dst, src, src)
    grid = resample_grid(grid, resample_t).reshape(batch, channels, dst * dst, dst * dst).swapaxes(2, 3)  # queries
    top = ops.cat((cls_cls, cls_row.reshape(batch, channels, 1, dst * dst)), axis=3)
    rest = ops.cat((cls_col.reshape(batch, channels, dst * dst, 1), grid), axis=3)
    return ops.cat((top, rest), axis=2)


def forget_compiled_graphs(cell: nn.Cell) -> None:
    """Make graph mode compile `cell` and its sub-cells afresh after a sub-cell was replaced.

    MindSpore keys a Cell's compiled graph by the Cell's creation time and id, not by what it
    holds, so a new head would otherwise leave the old graph (and the old head) running.
    """
    for _, sub in cell.cells_and_names():
        object.__setattr__(sub, "_create_time", time.time_ns())
