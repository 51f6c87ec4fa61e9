"""Model configurations of the DVT cascades, one per registered name.

A config is the single source of truth for both backends: they build every layer from
these fields and restate none of them. Geometry of the published release (token grids,
stems, widths, depths) is reproduced exactly for the three release names.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .registry import register_model_config

REUSE_MODES = ("none", "feature", "relation", "both")
STEM_KINDS = ("t2t", "patch")
POS_EMBED_KINDS = ("sinusoid", "learned")

# The release names its three backbones by how many tokens they see.
RELEASE_STAGE_NAMES = ("less_less_token", "less_token", "normal_token")

# Soft splits (kernel, stride, padding) of the release's performer T2T stems.
RELEASE_T2T_SPLITS = {
    "performer_less_less_token": ((14, 8, 3), (3, 2, 1), (3, 2, 1)),
    "performer_less_token": ((11, 6, 5), (3, 2, 1), (3, 2, 1)),
    "performer": ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
}
# Patch embedding (kernel, stride, padding) of the release's DeiT stems, by patch size.
RELEASE_PATCH_STEMS = {32: (32, 32, 0), 23: (23, 23, 3), 16: (16, 16, 0)}


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution/unfold along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class StemSpec:
    """How one stage turns an image into tokens.

    kind "t2t": a Tokens-to-Token stem, one (kernel, stride, padding) per soft split,
    with a performer between consecutive splits and a linear projection after the last.
    kind "patch": a strided convolution, `splits` holds its single (kernel, stride, padding).
    """

    kind: str
    splits: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        if self.kind not in STEM_KINDS:
            raise ValueError(f"stem kind must be one of {STEM_KINDS}, got {self.kind!r}")
        if not self.splits or any(len(s) != 3 for s in self.splits):
            raise ValueError(f"stem splits must be (kernel, stride, padding) triples, got {self.splits!r}")
        if self.kind == "patch" and len(self.splits) != 1:
            raise ValueError(f"a patch stem has exactly one (kernel, stride, padding), got {self.splits!r}")

    def sizes(self, img_size: int) -> tuple[int, ...]:
        """Side length of the token grid after each split."""
        out, size = [], img_size
        for kernel, stride, padding in self.splits:
            size = conv_output_size(size, kernel, stride, padding)
            if size < 1:
                raise ValueError(f"stem {self.splits} leaves no tokens for image size {img_size}")
            out.append(size)
        return tuple(out)

    def grid(self, img_size: int) -> int:
        return self.sizes(img_size)[-1]


@dataclass(frozen=True)
class StageSpec:
    """One exit of the cascade: its state-dict prefix and its stem."""

    name: str
    stem: StemSpec


@dataclass(frozen=True)
class DVTConfig:
    name: str
    family: str
    stages: tuple[StageSpec, ...]
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    layernorm_eps: float
    pos_embed: str
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    token_dim: int = 64
    reuse: str = "both"
    reuse_dim: int = 48
    reuse_hidden: int = 128
    relation_expansion: int = 3
    performer_kernel_ratio: float = 0.5
    performer_eps: float = 1e-8
    stem_layernorm_eps: float = 1e-5
    stem_drop_rate: float = 0.1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    description: str = field(default="", compare=False)

    def __post_init__(self):
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {self.reuse!r}")
        if self.pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {self.pos_embed!r}")
        if not self.stages:
            raise ValueError("a DVT config needs at least one stage")
        for key in ("embed_dim", "depth", "num_heads", "img_size", "in_chans", "num_classes", "token_dim",
                    "reuse_dim", "reuse_hidden", "relation_expansion"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("mlp_ratio", "performer_kernel_ratio", "layernorm_eps", "performer_eps", "stem_layernorm_eps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
        for key in ("stem_drop_rate", "drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"{key} must be a probability in [0, 1), got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        grids = self.grids  # raises when a stem leaves no tokens
        if list(grids) != sorted(grids):
            raise ValueError(f"stages must see more and more tokens, got grids {grids}")

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def feature_reuse(self) -> bool:
        return self.reuse in ("feature", "both")

    @property
    def relation_reuse(self) -> bool:
        return self.reuse in ("relation", "both")

    @property
    def grids(self) -> tuple[int, ...]:
        """Token grid side of every exit, fewest tokens first."""
        return tuple(stage.stem.grid(self.img_size) for stage in self.stages)

    @property
    def num_tokens(self) -> tuple[int, ...]:
        """Sequence length of every stage, class token included."""
        return tuple(g * g + 1 for g in self.grids)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def relation_channels(self) -> int:
        """Channels of a stage's stacked attention logits: heads x depth."""
        return self.num_heads * self.depth

    @property
    def relation_hidden(self) -> int:
        """Width between the two 1x1 convolutions that mix the reused relations."""
        return self.relation_channels * self.relation_expansion

    @property
    def performer_features(self) -> int:
        return int(self.token_dim * self.performer_kernel_ratio)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Stochastic-depth rate of every block of a stage, rising linearly to drop_path_rate."""
        return tuple(float(rate) for rate in np.linspace(0.0, self.drop_path_rate, self.depth))

    def stage_reuses(self, index: int) -> tuple[bool, bool]:
        """(feature reuse, relation reuse) of stage `index`; the first stage reuses nothing."""
        if index == 0:
            return False, False
        return self.feature_reuse, self.relation_reuse

    def stem_widths(self, index: int) -> tuple[int, ...]:
        """Input width of every soft split's consumer in stage `index`'s T2T stem: its performers,
        then the final projection (a split of k x k patches of C channels gives C*k*k)."""
        splits = self.stages[index].stem.splits
        return (self.in_chans * splits[0][0] ** 2,) + tuple(self.token_dim * kernel**2 for kernel, _, _ in splits[1:])

    def mlp_in(self, index: int) -> int:
        """Input width of a block's MLP in stage `index`: the tokens, widened by the reused features."""
        return self.embed_dim + self.reuse_dim if self.stage_reuses(index)[0] else self.embed_dim

    def replace(self, **overrides) -> "DVTConfig":
        """A copy with fields overridden; `stages` may be given in `to_dict`'s form."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown} for {self.name}; known fields: {sorted(known)}")
        if "stages" in overrides:
            overrides["stages"] = _stages(overrides["stages"])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DVTConfig":
        return cls(**{**data, "stages": _stages(data["stages"])})


def _stages(stages) -> tuple[StageSpec, ...]:
    """Stages as StageSpecs, from StageSpecs or from `to_dict`'s nested dicts."""
    return tuple(
        s if isinstance(s, StageSpec)
        else StageSpec(
            name=s["name"], stem=StemSpec(kind=s["stem"]["kind"], splits=tuple(tuple(x) for x in s["stem"]["splits"]))
        )
        for s in stages
    )


def _t2t_stages(*tokens_types: str) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(name, StemSpec("t2t", RELEASE_T2T_SPLITS[t])) for name, t in zip(RELEASE_STAGE_NAMES, tokens_types)
    )


def _patch_stages(*patch_sizes: int) -> tuple[StageSpec, ...]:
    return tuple(
        StageSpec(name, StemSpec("patch", (RELEASE_PATCH_STEMS[p],)))
        for name, p in zip(RELEASE_STAGE_NAMES, patch_sizes)
    )


_RELEASE_T2T = _t2t_stages("performer_less_less_token", "performer_less_token", "performer")

@register_model_config
def dvt_t2t_vit_12() -> DVTConfig:
    return DVTConfig(
        name="dvt_t2t_vit_12", family="t2t_vit", stages=_RELEASE_T2T, embed_dim=256, depth=12, num_heads=4,
        mlp_ratio=2.0, qkv_bias=False, layernorm_eps=1e-5, pos_embed="sinusoid",
        description="DVT over T2T-ViT-12, 7x7 -> 10x10 -> 14x14 tokens (release DVT_T2t_vit_12)",
    )


@register_model_config
def dvt_t2t_vit_14() -> DVTConfig:
    return DVTConfig(
        name="dvt_t2t_vit_14", family="t2t_vit", stages=_RELEASE_T2T, embed_dim=384, depth=14, num_heads=6,
        mlp_ratio=3.0, qkv_bias=False, layernorm_eps=1e-5, pos_embed="sinusoid",
        description="DVT over T2T-ViT-14, 7x7 -> 10x10 -> 14x14 tokens (release DVT_T2t_vit_14)",
    )


@register_model_config
def dvt_deit_small() -> DVTConfig:
    return DVTConfig(
        name="dvt_deit_small", family="deit", stages=_patch_stages(32, 23, 16), embed_dim=384, depth=12,
        num_heads=6, mlp_ratio=4.0, qkv_bias=True, layernorm_eps=1e-6, pos_embed="learned",
        description="DVT over DeiT-S, 7x7 -> 10x10 -> 14x14 tokens (release DVT_Deit_small)",
    )


@register_model_config
def dvt_t2t_vit_fmnist() -> DVTConfig:
    # 28x28 grey images: T2T soft splits to 3x3, 5x5 and 7x7 tokens, small enough for 2 CPU cores.
    # Every first split is strided: stride-1 ones made performers run over 400 and 784 tokens, and
    # those two stems took 1.3 s of a 2.3 s training step (batch 128, one CPU thread); now 0.3 of 1.4.
    stages = (
        StageSpec("less_less_token", StemSpec("t2t", ((6, 2, 0), (3, 2, 1), (3, 2, 1)))),  # 28 -> 12 -> 6 -> 3
        StageSpec("less_token", StemSpec("t2t", ((7, 3, 2), (3, 2, 1), (3, 1, 1)))),  # 28 -> 9 -> 5 -> 5
        StageSpec("normal_token", StemSpec("t2t", ((5, 2, 2), (3, 2, 1), (3, 1, 1)))),  # 28 -> 14 -> 7 -> 7
    )
    return DVTConfig(
        name="dvt_t2t_vit_fmnist", family="t2t_vit", stages=stages, embed_dim=96, depth=4, num_heads=3,
        mlp_ratio=2.0, qkv_bias=False, layernorm_eps=1e-5, pos_embed="sinusoid", img_size=28, in_chans=1,
        num_classes=10, token_dim=32,
        description="small DVT for 28x28 one-channel images (Fashion-MNIST), 3x3 -> 5x5 -> 7x7 tokens",
    )


def static_baseline(config: DVTConfig) -> DVTConfig:
    """The static transformer DVT is measured against: the same backbone, one exit on the largest grid."""
    return config.replace(
        name=config.name + "_static", stages=(config.stages[-1],), reuse="none",
        description=f"static baseline of {config.name}: its last exit alone "
        f"({config.grids[-1]}x{config.grids[-1]} tokens), no reuse",
    )


@register_model_config
def dvt_t2t_vit_fmnist_static() -> DVTConfig:
    return static_baseline(dvt_t2t_vit_fmnist())


def config_from_release_json(data: dict, name: str = "release_fixture") -> DVTConfig:
    """Config of a cascade described in the release's own terms (`*_config.json` fixtures)."""
    family = data["family"]
    common = dict(
        name=name, embed_dim=data["embed_dim"], depth=data["depth"], num_heads=data["num_heads"],
        mlp_ratio=float(data["mlp_ratio"]), qkv_bias=bool(data["qkv_bias"]), num_classes=data["num_classes"],
        img_size=data.get("img_size", 224),
    )
    if family == "t2t_vit":
        return DVTConfig(
            family=family, stages=_t2t_stages(*data["tokens_types"]), token_dim=data["token_dim"],
            layernorm_eps=data.get("layernorm_eps", 1e-5), pos_embed="sinusoid", **common,
        )
    if family == "deit":
        return DVTConfig(
            family=family, stages=_patch_stages(*data["patch_sizes"]), layernorm_eps=data.get("layernorm_eps", 1e-6),
            pos_embed="learned", **common,
        )
    raise ValueError(f"unknown release family {family!r}; expected 't2t_vit' or 'deit'")
