"""Multiply-adds of every stage of a DVT config, for one image.

Counted the way fvcore counts (the paper's tool): one per multiply-add in linear layers,
convolutions and matrix products, five per element of an affine LayerNorm, nothing for
element-wise work (softmax, GELU, additions). Reuse overheads are included: the feature
reuse MLP and the relation 1x1 convolutions, and the resampling between token grids.
"""
from __future__ import annotations

from dataclasses import dataclass

from .configs import DVTConfig

LAYERNORM_MACS_PER_ELEMENT = 5


@dataclass(frozen=True)
class StageMacs:
    """Multiply-adds of one stage, by part."""

    stem: int
    blocks: int
    feature_reuse: int
    relation_reuse: int
    head: int

    @property
    def total(self) -> int:
        return self.stem + self.blocks + self.feature_reuse + self.relation_reuse + self.head


def _layernorm(tokens: int, dim: int) -> int:
    return LAYERNORM_MACS_PER_ELEMENT * tokens * dim


def _resample_grid(maps: int, src: int, dst: int) -> int:
    # two one-axis products on (maps, s, s): s*s*t then s*t*t per map
    return maps * (src * src * dst + src * dst * dst)


def performer_macs(tokens: int, dim: int, emb: int, features: int) -> int:
    """One T2T performer over `tokens` tokens of width `dim` to width `emb` with `features` random features."""
    return (
        _layernorm(tokens, dim)
        + tokens * dim * 3 * emb  # kqv
        + 2 * tokens * emb * features  # random features of k and q
        + tokens * features  # normaliser
        + 2 * tokens * emb * features  # k'v and q'(k'v)
        + tokens * emb * emb  # proj
        + _layernorm(tokens, emb)
        + 2 * tokens * emb * emb  # mlp
    )


def stem_macs(config: DVTConfig, index: int) -> int:
    stem = config.stages[index].stem
    sizes = stem.sizes(config.img_size)
    if stem.kind == "patch":
        kernel = stem.splits[0][0]
        return sizes[0] ** 2 * config.embed_dim * config.in_chans * kernel * kernel
    in_dims = config.stem_widths(index)
    total = sum(
        performer_macs(sizes[i] ** 2, in_dims[i], config.token_dim, config.performer_features)
        for i in range(len(sizes) - 1)
    )
    return total + sizes[-1] ** 2 * in_dims[-1] * config.embed_dim


def stage_macs(config: DVTConfig, index: int) -> StageMacs:
    """Multiply-adds of stage `index` alone (its stem, blocks, reuse of the previous stage, head)."""
    dim, tokens = config.embed_dim, config.num_tokens[index]
    feature_reuse, relation_reuse = config.stage_reuses(index)
    mlp_in = config.mlp_in(index)
    block = (
        _layernorm(tokens, dim)
        + tokens * dim * 3 * dim  # qkv
        + 2 * tokens * tokens * dim  # q k^T and attn v over all heads
        + tokens * dim * dim  # proj
        + _layernorm(tokens, mlp_in)
        + tokens * mlp_in * config.mlp_hidden
        + tokens * config.mlp_hidden * dim
    )
    blocks = config.depth * block + _layernorm(tokens, dim)  # + final norm

    feature = relation = 0
    if feature_reuse or relation_reuse:
        src, dst = config.grids[index - 1], config.grids[index]
        prev_tokens = config.num_tokens[index - 1]
    if feature_reuse:
        per_block = (
            _layernorm(prev_tokens, dim)
            + prev_tokens * dim * config.reuse_hidden
            + prev_tokens * config.reuse_hidden * config.reuse_dim
            + _resample_grid(config.reuse_dim, src, dst)
        )
        feature = config.depth * per_block
    if relation_reuse:
        channels, hidden = config.relation_channels, config.relation_hidden
        convs = 2 * prev_tokens * prev_tokens * channels * hidden
        # class row + class column + every query row (keys) + every new key column (queries)
        maps = channels * (2 + src * src + dst * dst)
        relation = convs + _resample_grid(maps, src, dst)

    return StageMacs(
        stem=stem_macs(config, index), blocks=blocks, feature_reuse=feature, relation_reuse=relation,
        head=dim * config.num_classes,
    )


def stage_flops(config: DVTConfig) -> tuple[int, ...]:
    """Multiply-adds of each stage alone."""
    return tuple(stage_macs(config, i).total for i in range(config.num_exits))


def cumulative_flops(config: DVTConfig) -> tuple[int, ...]:
    """Multiply-adds spent on an image that leaves at each exit (all stages up to it)."""
    out, total = [], 0
    for macs in stage_flops(config):
        total += macs
        out.append(total)
    return tuple(out)


def exit_gflops(config: DVTConfig) -> tuple[float, ...]:
    """Cumulative GFLOPs (10^9 multiply-adds) per exit, the unit of the paper's tables."""
    return tuple(macs / 1e9 for macs in cumulative_flops(config))
