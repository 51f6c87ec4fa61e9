"""Building blocks of a DVT stage in PyTorch, laid out to the release's state-dict keys."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, trunc_normal_
from torch import nn

from dvt_shared.configs import DVTConfig


class TokenPerformer(nn.Module):
    """Performer token mixer of the T2T stem (linear attention with positive random features).

    `w` is a fixed orthogonal random projection saved with the weights; `v` is the skip path.
    """

    def __init__(self, dim: int, emb: int, kernel_ratio: float, eps: float, norm_eps: float, drop: float):
        super().__init__()
        self.emb = emb
        self.m = int(emb * kernel_ratio)
        self.eps = eps
        self.kqv = nn.Linear(dim, 3 * emb)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(emb, eps=norm_eps)
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb), nn.Dropout(drop))
        self.register_buffer("w", nn.init.orthogonal_(torch.empty(self.m, emb)) * math.sqrt(self.m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        x = v + self.dp(self.proj(linear_attention(k, q, v, self.w, self.eps)))
        return x + self.mlp(self.norm2(x))


def prm_exp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """exp(w.x - |x|^2 / 2) / sqrt(m): positive random features of the softmax kernel (m = rows of w)."""
    xd = (x * x).sum(dim=-1, keepdim=True) / 2
    return torch.exp(x @ w.t().to(x.dtype) - xd) / math.sqrt(w.shape[0])


# Leaf calls when torch.fx traces a model (timm's feature extraction): the attention picks its precision by
# its input's dtype, and autograd functions do not trace.
@register_notrace_function
def linear_attention(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The performer's attention of queries `q` over keys `k` and values `v` through the random features `w`."""
    # The random features and their sums exceed fp16's 65504 on real images (the shipped model's stem gave
    # inf, then NaN, on every test image): under fp16 autocast the linear attention runs in float32, as
    # MindSpore's fp16 engine runs it. bf16 has float32's range.
    half = k.dtype == torch.float16
    dtype = torch.float32 if half else k.dtype
    with torch.autocast(k.device.type, enabled=False) if half else contextlib.nullcontext():
        k, q, wide_v = k.to(dtype), q.to(dtype), v.to(dtype)
        kp, qp = prm_exp(k, w), prm_exp(q, w)
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)
        kptv = wide_v.transpose(1, 2) @ kp
        return ((qp @ kptv.transpose(1, 2)) / (normaliser + eps)).to(v.dtype)


@register_notrace_function
def soft_split_tokens(grid: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(B, H, W, C) grid -> (B, L, C*kernel*kernel) tokens: nn.Unfold's patches, bit for bit, token-major.

    Token-major in and out, a T2T stem's reshapes between performers are free views. The patches
    are strided views copied once: im2col on this CPU build is 10-50x slower; the gradient is
    col2im (F.fold), 2-3x faster than autograd's backward of the views. ONNX export cannot
    trace the views with a dynamic batch; it gets a grouped convolution with one-hot filters
    instead, also exact (each output is one input times 1, plus zeros), which ONNX Runtime
    runs several times faster than the Gather/Transpose chain it makes of im2col.
    """
    if torch.onnx.is_in_onnx_export():
        x = grid.permute(0, 3, 1, 2)
        channels = int(x.shape[1])
        # built in numpy so that the exporter records a constant of known shape
        one_hot = np.tile(
            np.eye(kernel * kernel, dtype=np.float32).reshape(kernel * kernel, 1, kernel, kernel), (channels, 1, 1, 1),
        )
        filters = torch.from_numpy(one_hot).to(dtype=x.dtype, device=x.device)
        return F.conv2d(x, filters, stride=stride, padding=padding, groups=channels).flatten(2).transpose(1, 2)
    return _TokenSoftSplit.apply(grid, kernel, stride, padding)


class _TokenSoftSplit(torch.autograd.Function):
    """Forward: one copy of strided views; backward: its adjoint, col2im."""

    @staticmethod
    def forward(ctx, grid: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
        ctx.geometry = (tuple(grid.shape[1:3]), kernel, stride, padding)
        if padding:
            grid = F.pad(grid, (0, 0, padding, padding, padding, padding))
        batch, channels = grid.shape[0], grid.shape[3]
        patches = grid.unfold(1, kernel, stride).unfold(2, kernel, stride)  # (B, h, w, C, k, k)
        return patches.reshape(batch, -1, channels * kernel * kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, kernel, stride, padding = ctx.geometry
        grad_grid = F.fold(grad.transpose(1, 2), size, kernel, stride=stride, padding=padding)
        return grad_grid.permute(0, 2, 3, 1), None, None, None


class T2TStem(nn.Module):
    """Tokens-to-Token stem: soft split (unfold), performer, reshape to a grid, repeat; then project."""

    def __init__(self, config: DVTConfig, index: int):
        super().__init__()
        stem = config.stages[index].stem
        self.sizes = stem.sizes(config.img_size)
        self.splits = stem.splits
        in_dims = config.stem_widths(index)
        for i, dim in enumerate(in_dims[:-1], start=1):
            self.add_module(
                f"attention{i}",
                TokenPerformer(
                    dim, config.token_dim, config.performer_kernel_ratio, config.performer_eps,
                    config.stem_layernorm_eps, config.stem_drop_rate,
                ),
            )
        self.project = nn.Linear(in_dims[-1], config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = soft_split_tokens(x.permute(0, 2, 3, 1), *self.splits[0])
        for i, split in enumerate(self.splits[1:], start=1):
            x = getattr(self, f"attention{i}")(x)
            size = self.sizes[i - 1]
            x = soft_split_tokens(x.reshape(x.shape[0], size, size, x.shape[2]), *split)
        return self.project(x)


class PatchEmbed(nn.Module):
    """Strided convolution to tokens; unlike timm's, it takes a padding (the release's 10x10 DeiT stem)."""

    def __init__(self, config: DVTConfig, index: int):
        super().__init__()
        kernel, stride, padding = config.stages[index].stem.splits[0]
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention that adds reused relations to its logits and returns them."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, relation_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        # unbind, not indexing: the gradient of three index selects is three zero-filled full-size buffers
        q, k, v = qkv.unbind(0)
        if relation_bias is None:
            logits = (q @ k.transpose(-2, -1)) * self.scale
        else:
            # bias + scale * q.k in one product, not three passes over the logits
            logits = torch.baddbmm(
                relation_bias.reshape(batch * self.num_heads, tokens, tokens),
                q.reshape(batch * self.num_heads, tokens, -1),
                k.reshape(batch * self.num_heads, tokens, -1).transpose(1, 2), alpha=self.scale,
            ).view(batch, self.num_heads, tokens, tokens)
        attn = self.attn_drop(logits.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x)), logits


class Block(nn.Module):
    """Transformer block; with feature reuse its MLP also reads the previous stage's tokens."""

    def __init__(self, config: DVTConfig, index: int, drop_path: float):
        super().__init__()
        dim, eps, mlp_in = config.embed_dim, config.layernorm_eps, config.mlp_in(index)
        feature_reuse = config.stage_reuses(index)[0]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias, config.attn_drop_rate, config.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(mlp_in, eps=eps)
        self.mlp = Mlp(mlp_in, config.mlp_hidden, dim, act_layer=nn.GELU, drop=config.drop_rate)
        self.feature_reuse = feature_reuse
        if feature_reuse:
            # release key spelling: feature_resuse_mlp
            self.feature_resuse_mlp = nn.Sequential(
                nn.LayerNorm(dim, eps=eps),
                Mlp(dim, config.reuse_hidden, config.reuse_dim, act_layer=nn.GELU, drop=config.drop_rate),
            )

    def forward(
        self,
        x: torch.Tensor,
        reused_features: torch.Tensor | None = None,
        resample_t: torch.Tensor | None = None,
        relation_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, logits = self.attn(self.norm1(x), relation_bias)
        x = x + self.drop_path(y)
        mlp_in = x
        if self.feature_reuse:
            # the class token's row would be dropped: the per-token MLP runs on the grid tokens only
            reused = resample_tokens(self.feature_resuse_mlp(reused_features[:, 1:]), resample_t)
            reused = F.pad(reused, (0, 0, 1, 0))  # the class token gets a zero row
            mlp_in = torch.cat((x, reused), dim=2)
        return x + self.drop_path(self.mlp(self.norm2(mlp_in))), logits


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution (nn.Conv2d's parameters and state-dict keys) computed as one batched
    matrix product over the pixels: for few channels and many pixels, 2x faster than oneDNN's
    convolution, which reorders the maps to its blocked layout and back."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        weight = self.weight.flatten(1).expand(batch, -1, -1)
        return torch.baddbmm(self.bias[:, None], weight, x.flatten(2)).view(batch, -1, height, width)


def grid_map(resample_t: torch.Tensor) -> torch.Tensor:
    """(s*s, t*t) map of flattened s x s grids to t x t grids, built from the (s, t) one-axis map:
    the Kronecker product, as in dvt_shared.resample_matrix (transposed)."""
    src, dst = resample_t.shape
    return (resample_t[:, None, :, None] * resample_t[None, :, None, :]).reshape(src * src, dst * dst)


def resample_tokens(tokens: torch.Tensor, resample_t: torch.Tensor) -> torch.Tensor:
    """(B, s*s, C) grid tokens -> (B, t*t, C) with the (s, t) transposed one-axis map of dvt_shared on both axes.

    Both axes move in one product with the grid map, on the tokens as they are: one matrix
    product runs far faster than two with inner sizes of s and t (s, t < 15), each needing a transpose.
    """
    return grid_map(resample_t).transpose(0, 1) @ tokens


def relation_map(resample_t: torch.Tensor) -> torch.Tensor:
    """(t*t+1, s*s+1) map E of a token sequence with a leading class token (dvt_shared.relation_resample_matrix)."""
    src = resample_t.shape[0]
    class_row = F.pad(resample_t.new_ones(1, 1), (0, src * src))
    return torch.cat((class_row, F.pad(grid_map(resample_t).transpose(0, 1), (1, 0))), dim=0)


def resample_relations(relations: torch.Tensor, resample_t: torch.Tensor) -> torch.Tensor:
    """(B, C, s*s+1, s*s+1) query x key logits -> (B, C, t*t+1, t*t+1); class row and column carried along.

    E @ R @ E.T with E = relation_map(resample_t) = dvt_shared.relation_resample_matrix: two
    products of moderate size, several times faster than moving the 4 grid axes one by one.
    """
    expand = relation_map(resample_t)
    return expand @ relations @ expand.transpose(0, 1)


def init_weights(module: nn.Module) -> None:
    """The release's initialisation: truncated normal linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
