"""Visual Transformer (VT, Wu et al., ICCV 2021): model configs and FLOP formulas.

With a feature map X (HW x C) and visual tokens T (L x C_T), a VT module is

    filter-based tokenizer   A = softmax_HW(X W_A),            T = A^T X    (W_A: C x L)
    recurrent tokenizer      W_R = T_in W_{T->R},              T = softmax_HW(X W_R^T)^T X
    transformer              T' = T_in + softmax_L((T_in K)(T_in Q)^T) T_in
                             T_out = T' + ReLU(T' F1) F2
    projector                X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T

with a value projection C -> C_T after a tokenizer and C_T -> C inside the projector when
the widths differ. Every choice the paper leaves open is a `VTSpec` field whose default
is the paper-faithful one. Both backends build their layers from these configs alone.

FLOPs are multiply-adds counted as fvcore counts them (a test holds the formulas to
fvcore's count of the PyTorch models): one per multiply-add of a convolution, linear map
or matrix product, two per element of an eval-mode BatchNorm, one per input element of
the global average pool, one per output element of a nearest upsampling; element-wise
work (softmax, ReLU, additions, max pooling, token averaging) is free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .registry import register_model_config

BLOCK_KINDS = ("basic", "bottleneck")
# imagenet: timm's 7x7/2 convolution and 3x3/2 max pool; small: one 3x3/1 convolution, no pool.
STEM_KINDS = ("imagenet", "small")
ATTENTION_SCALES = ("none", "inverse_sqrt")
VALUE_PROJECTIONS = ("when_widths_differ", "always")
PROJECTOR_TOKENS = ("own_level", "all_levels")

BLOCK_EXPANSION = {"basic": 1, "bottleneck": 4}
BATCHNORM_MACS_PER_ELEMENT = 2  # eval-mode BatchNorm with affine parameters, as fvcore counts it
# The stem's geometry as (kernel, stride, padding) of its convolution and of its max pool (None: no pool).
STEM_GEOMETRY = {"imagenet": ((7, 2, 3), (3, 2, 1)), "small": ((3, 1, 1), None)}


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _positive_ints(owner: str, **values) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {key} must be a positive integer, got {value!r}")


def _choice(owner: str, key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {key} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ResNetSpec:
    """A ResNet trunk as timm lays it out: `conv1`, `bn1`, `maxpool`, then `layer1`..`layer4`.

    `channels` are timm's per-stage base widths; a bottleneck stage outputs four times its
    width. BatchNorm momentum is PyTorch's convention; MindSpore's momentum is 1 - it.
    """

    block: str
    layers: tuple[int, int, int, int]
    channels: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    batchnorm_eps: float = 1e-5
    batchnorm_momentum: float = 0.1

    def __post_init__(self):
        _choice("ResNetSpec", "block", self.block, BLOCK_KINDS)
        _choice("ResNetSpec", "stem", self.stem, STEM_KINDS)
        if len(self.layers) != 4 or len(self.channels) != 4:
            raise ValueError(
                f"ResNetSpec: layers and channels need one entry per stage (4), got {self.layers}, {self.channels}"
            )
        _positive_ints("ResNetSpec", stem_width=self.stem_width,
                       **{f"layers[{i}]": v for i, v in enumerate(self.layers)},
                       **{f"channels[{i}]": v for i, v in enumerate(self.channels)})
        if not 0.0 < self.batchnorm_momentum < 1.0:
            raise ValueError(f"ResNetSpec: batchnorm_momentum must lie in (0, 1), got {self.batchnorm_momentum}")

    @property
    def expansion(self) -> int:
        return BLOCK_EXPANSION[self.block]

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of layer1..layer4."""
        return tuple(c * self.expansion for c in self.channels)

    def stem_size(self, size: int) -> int:
        """Side after the stem (convolution and pool) along one axis."""
        conv, pool = STEM_GEOMETRY[self.stem]
        size = _out_size(size, *conv)
        return _out_size(size, *pool) if pool else size

    def stage_sizes(self, size: int) -> tuple[int, int, int, int]:
        """Side after layer1..layer4 along one axis; layers 2-4 halve it with a 3x3/2 convolution."""
        sizes = [self.stem_size(size)]
        for _ in range(3):
            sizes.append(_out_size(sizes[-1], 3, 2, 1))
        return tuple(sizes)


@dataclass(frozen=True)
class VTSpec:
    """The VT modules' widths and the choices the paper leaves open (defaults: the paper's).

    tokens: L, visual tokens per tokenizer.
    token_dim: C_T, the tokens' width.
    qk_ratio: the transformer's K, Q are C_T x (qk_ratio * C_T); the paper's are C x C/2.
    mlp_ratio: F1 is C_T x (mlp_ratio * C_T) and F2 its way back; the paper's are C x C.
    projector_qk_ratio: the projector's W_Q is C x d and W_K is C_T x d with d = ratio * C;
        the paper's W_Q, W_K are C x C.
    attention_scale: "none" (the paper's equations) or "inverse_sqrt" (1/sqrt(d), as in
        common transformers), applied to the transformer's and the projector's key-query products.
    value_projection: "when_widths_differ" (the paper: tokens are weighted averages of X
        itself; a C -> C_T map after the tokenizer and a C_T -> C map in the projector exist
        only when C_T != C) or "always".
    """

    tokens: int
    token_dim: int
    qk_ratio: float = 0.5
    mlp_ratio: float = 1.0
    projector_qk_ratio: float = 1.0
    attention_scale: str = "none"
    value_projection: str = "when_widths_differ"

    def __post_init__(self):
        _positive_ints("VTSpec", tokens=self.tokens, token_dim=self.token_dim)
        _choice("VTSpec", "attention_scale", self.attention_scale, ATTENTION_SCALES)
        _choice("VTSpec", "value_projection", self.value_projection, VALUE_PROJECTIONS)
        for key in ("qk_ratio", "mlp_ratio"):
            if int(getattr(self, key) * self.token_dim) < 1:
                raise ValueError(f"VTSpec: {key} {getattr(self, key)} leaves no width at token_dim {self.token_dim}")
        if self.projector_qk_ratio <= 0:
            raise ValueError(f"VTSpec: projector_qk_ratio must be positive, got {self.projector_qk_ratio}")

    @property
    def qk_dim(self) -> int:
        return int(self.token_dim * self.qk_ratio)

    @property
    def mlp_hidden(self) -> int:
        return int(self.token_dim * self.mlp_ratio)

    def projector_qk_dim(self, channels: int) -> int:
        return max(1, int(channels * self.projector_qk_ratio))

    def projects_values(self, channels: int) -> bool:
        """Whether a tokenizer maps C -> C_T and a projector C_T -> C for feature maps of `channels`."""
        return self.value_projection == "always" or channels != self.token_dim

    def scale(self, width: int) -> float:
        """Factor of a key-query product of `width`."""
        return width**-0.5 if self.attention_scale == "inverse_sqrt" else 1.0


def _nested_replace(config, overrides: dict):
    """dataclasses.replace that names unknown fields and takes dicts for the nested specs."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config field(s) {unknown} for {config.name}; known fields: {sorted(known)}")
    merged = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in _NESTED_SPECS:
            current = getattr(config, key)
            value = _replace_spec(current, value) if current is not None else _spec_from_dict(_NESTED_SPECS[key], value)
        merged[key] = value
    return dataclasses.replace(config, **merged)


def _replace_spec(spec, overrides: dict):
    known = {f.name for f in dataclasses.fields(spec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown field(s) {unknown} for {type(spec).__name__}; known fields: {sorted(known)}")
    return dataclasses.replace(spec, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def _spec_from_dict(cls, data: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


_NESTED_SPECS = {"trunk": ResNetSpec, "vt": VTSpec}


@dataclass(frozen=True)
class VTResNetConfig:
    """A ResNet whose last stage is replaced by `vt_modules` VT modules at the third stage's
    resolution (family "vt_resnet"), or the plain ResNet of the same trunk (family "resnet",
    `vt` None). The VT head averages the last module's tokens and applies a linear map.

    The first module's tokenizer is filter-based, the others recurrent; every module but
    the last projects its tokens back onto the feature map the next one tokenizes. The last
    module has no projector: the head reads its tokens, so a projection would reach nothing.
    """

    name: str
    family: str
    trunk: ResNetSpec
    vt: VTSpec | None = None
    vt_modules: int = 0
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    description: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        _choice(self.name, "family", self.family, ("vt_resnet", "resnet"))
        _positive_ints(self.name, img_size=self.img_size, in_chans=self.in_chans, num_classes=self.num_classes)
        if self.family == "vt_resnet":
            if self.vt is None or self.vt_modules < 1:
                raise ValueError(f"{self.name}: a vt_resnet needs a VTSpec and at least one VT module")
        elif self.vt is not None or self.vt_modules:
            raise ValueError(f"{self.name}: a plain resnet has no VT modules (vt None, vt_modules 0)")

    @property
    def num_exits(self) -> int:
        return 1

    @property
    def feature_channels(self) -> int:
        """C: channels of the feature map the VT modules work on (layer3's output)."""
        return self.trunk.stage_channels[2]

    @property
    def feature_size(self) -> int:
        """Side of that feature map."""
        return self.trunk.stage_sizes(self.img_size)[2]

    @property
    def head_features(self) -> int:
        return self.vt.token_dim if self.family == "vt_resnet" else self.trunk.stage_channels[3]

    def replace(self, **overrides) -> "VTResNetConfig":
        return _nested_replace(self, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VTResNetConfig":
        data = dict(data)
        data["trunk"] = _spec_from_dict(ResNetSpec, data["trunk"])
        data["vt"] = _spec_from_dict(VTSpec, data["vt"]) if data.get("vt") is not None else None
        return cls(**data)


@dataclass(frozen=True)
class VTFPNConfig:
    """VT-FPN: a ResNet trunk and an FPN whose 3x3 output convolutions and top-down pathway
    are replaced by VT: every level's lateral output gives `vt.tokens` tokens, one transformer
    runs over all levels' tokens, and each level's projector maps tokens back onto it.

    projector_tokens: "own_level" (each level reads back the tokens it produced, after the
    shared transformer) or "all_levels". A 1x1 convolution over the sum of the levels,
    upsampled (nearest) to the finest, gives per-pixel logits at a quarter of the input size.
    """

    name: str
    trunk: ResNetSpec
    vt: VTSpec
    family: str = "vt_fpn"
    fpn_channels: int = 256
    projector_tokens: str = "own_level"
    img_size: tuple[int, int] = (800, 1216)
    in_chans: int = 3
    num_classes: int = 171
    description: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        _choice(self.name, "family", self.family, ("vt_fpn",))
        _choice(self.name, "projector_tokens", self.projector_tokens, PROJECTOR_TOKENS)
        if not isinstance(self.img_size, tuple) or len(self.img_size) != 2:
            raise ValueError(f"{self.name}: img_size is (height, width), got {self.img_size!r}")
        _positive_ints(self.name, height=self.img_size[0], width=self.img_size[1], in_chans=self.in_chans,
                       num_classes=self.num_classes, fpn_channels=self.fpn_channels)

    @property
    def num_exits(self) -> int:
        return 1

    @property
    def num_levels(self) -> int:
        return 4

    @property
    def head_features(self) -> int:
        """Channels of the merged map the classifier reads."""
        return self.fpn_channels

    def level_sizes(self, img_size: tuple[int, int] | None = None) -> tuple[tuple[int, int], ...]:
        """(height, width) of layer1..layer4's outputs: the FPN levels at strides 4, 8, 16, 32."""
        height, width = img_size or self.img_size
        return tuple(zip(self.trunk.stage_sizes(height), self.trunk.stage_sizes(width)))

    def replace(self, **overrides) -> "VTFPNConfig":
        if "img_size" in overrides:
            overrides["img_size"] = tuple(overrides["img_size"])
        return _nested_replace(self, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VTFPNConfig":
        data = dict(data)
        data["trunk"] = _spec_from_dict(ResNetSpec, data["trunk"])
        data["vt"] = _spec_from_dict(VTSpec, data["vt"])
        data["img_size"] = tuple(data["img_size"])
        return cls(**data)


# ---------------------------------------------------------------- registry

RESNET18 = ResNetSpec("basic", (2, 2, 2, 2))
RESNET34 = ResNetSpec("basic", (3, 4, 6, 3))
RESNET50 = ResNetSpec("bottleneck", (3, 4, 6, 3))
# The paper's VT-ResNet: 16 tokens of width 1024 on the 14x14x256 map of ResNet-18/34's third stage.
PAPER_VT_RESNET = VTSpec(tokens=16, token_dim=1024)
# The paper's VT-FPN: 8 tokens of width 1024 per level.
PAPER_VT_FPN = VTSpec(tokens=8, token_dim=1024)

@register_model_config
def vt_resnet18() -> VTResNetConfig:
    return VTResNetConfig(
        name="vt_resnet18", family="vt_resnet", trunk=RESNET18, vt=PAPER_VT_RESNET, vt_modules=2,
        description="ResNet-18 with its last stage replaced by 2 VT modules (16 tokens of width 1024) at 14x14",
    )


@register_model_config
def vt_resnet34() -> VTResNetConfig:
    # As for ResNet-18, one VT module per block of the replaced stage (ResNet-34's last stage has 3).
    return VTResNetConfig(
        name="vt_resnet34", family="vt_resnet", trunk=RESNET34, vt=PAPER_VT_RESNET, vt_modules=3,
        description="ResNet-34 with its last stage replaced by 3 VT modules (16 tokens of width 1024) at 14x14",
    )


@register_model_config
def vt_fpn_r50() -> VTFPNConfig:
    return VTFPNConfig(
        name="vt_fpn_r50", trunk=RESNET50, vt=PAPER_VT_FPN,
        description="VT-FPN on ResNet-50: 8 tokens of width 1024 per level, one transformer over all 32",
    )


# 28x28 grey images: a 3x3/1 stem without pooling keeps layer3 at 7x7 (49 positions for 8 tokens),
# and quarter widths keep a training epoch within minutes on one CPU thread.
FMNIST_TRUNK = ResNetSpec("basic", (2, 2, 2, 2), channels=(16, 32, 64, 128), stem="small", stem_width=16)


@register_model_config
def vt_resnet_fmnist() -> VTResNetConfig:
    # The paper's proportions at a quarter width: C_T = 4 C, 2 modules replacing a 2-block stage.
    return VTResNetConfig(
        name="vt_resnet_fmnist", family="vt_resnet", trunk=FMNIST_TRUNK, vt=VTSpec(tokens=8, token_dim=256),
        vt_modules=2, img_size=28, in_chans=1, num_classes=10,
        description="small VT-ResNet for 28x28 one-channel images: 2 VT modules (8 tokens of width 256) at 7x7",
    )


def plain_resnet(config: VTResNetConfig, name: str | None = None) -> VTResNetConfig:
    """The ResNet a VT-ResNet is measured against: the same trunk with its own last stage."""
    return dataclasses.replace(
        config, name=name or config.name.removeprefix("vt_"), family="resnet", vt=None, vt_modules=0,
        description=f"plain ResNet of {config.name}'s trunk (its own last stage, average pool, linear head)",
    )


@register_model_config
def resnet_fmnist() -> VTResNetConfig:
    return plain_resnet(vt_resnet_fmnist())


# ---------------------------------------------------------------- FLOPs


def _conv(out_h: int, out_w: int, cin: int, cout: int, kernel: int) -> int:
    return out_h * out_w * cin * cout * kernel * kernel


def _batchnorm(h: int, w: int, channels: int) -> int:
    return BATCHNORM_MACS_PER_ELEMENT * h * w * channels


def stem_macs(trunk: ResNetSpec, in_chans: int, height: int, width: int) -> int:
    (kernel, stride, padding), _ = STEM_GEOMETRY[trunk.stem]
    h, w = _out_size(height, kernel, stride, padding), _out_size(width, kernel, stride, padding)
    return _conv(h, w, in_chans, trunk.stem_width, kernel) + _batchnorm(h, w, trunk.stem_width)


def stage_macs(trunk: ResNetSpec, index: int, in_channels: int, in_hw: tuple[int, int]) -> int:
    """Multiply-adds of layer{index + 1} on an (in_channels, *in_hw) input."""
    width, out_channels = trunk.channels[index], trunk.stage_channels[index]
    stride = 1 if index == 0 else 2
    h, w = (_out_size(s, 3, stride, 1) for s in in_hw)
    total, channels = 0, in_channels
    for block in range(trunk.layers[index]):
        first_hw = in_hw if block == 0 else (h, w)
        if trunk.block == "basic":
            total += _conv(h, w, channels, width, 3) + _batchnorm(h, w, width)
            total += _conv(h, w, width, out_channels, 3) + _batchnorm(h, w, out_channels)
        else:
            # the 1x1 reduction runs at the block's input resolution, the 3x3 carries the stride
            total += _conv(*first_hw, channels, width, 1) + _batchnorm(*first_hw, width)
            total += _conv(h, w, width, width, 3) + _batchnorm(h, w, width)
            total += _conv(h, w, width, out_channels, 1) + _batchnorm(h, w, out_channels)
        if block == 0 and (stride != 1 or channels != out_channels):
            total += _conv(h, w, channels, out_channels, 1) + _batchnorm(h, w, out_channels)
        channels = out_channels
    return total


def trunk_macs(trunk: ResNetSpec, in_chans: int, height: int, width: int, stages: int) -> int:
    """Stem and the first `stages` stages."""
    total = stem_macs(trunk, in_chans, height, width)
    heights, widths = trunk.stage_sizes(height), trunk.stage_sizes(width)
    hw = (trunk.stem_size(height), trunk.stem_size(width))
    channels = trunk.stem_width
    for index in range(stages):
        total += stage_macs(trunk, index, channels, hw)
        hw, channels = (heights[index], widths[index]), trunk.stage_channels[index]
    return total


def tokenizer_macs(vt: VTSpec, positions: int, channels: int, recurrent: bool) -> int:
    """Filter-based or recurrent tokenizer on `positions` x `channels`, value projection included."""
    L = vt.tokens
    total = positions * channels * L  # X W_A, or X W_R^T
    total += L * positions * channels  # A^T X
    if recurrent:
        total += L * vt.token_dim * channels  # W_R = T_in W_{T->R}
    if vt.projects_values(channels):
        total += L * channels * vt.token_dim
    return total


def transformer_macs(vt: VTSpec, tokens: int) -> int:
    width, qk = vt.token_dim, vt.qk_dim
    return (
        2 * tokens * width * qk  # T K and T Q
        + tokens * qk * tokens  # (T K)(T Q)^T
        + tokens * tokens * width  # softmax(...) T
        + 2 * tokens * width * vt.mlp_hidden  # F1 and F2
    )


def projector_macs(vt: VTSpec, positions: int, channels: int, tokens: int) -> int:
    """Projector with (X W_Q)(T W_K)^T evaluated as X (W_Q (T W_K)^T): L x C filters, then one product per position."""
    qk = vt.projector_qk_dim(channels)
    total = tokens * vt.token_dim * qk  # T W_K
    total += tokens * qk * channels  # (T W_K) W_Q^T: one filter per token
    total += positions * channels * tokens  # X against the filters
    if vt.projects_values(channels):
        total += tokens * vt.token_dim * channels  # values C_T -> C
    total += positions * tokens * channels  # softmax(...) V
    return total


@dataclass(frozen=True)
class VTResNetMacs:
    trunk: int
    last_stage: int  # the VT modules, or the plain ResNet's layer4 and its average pool
    head: int

    @property
    def total(self) -> int:
        return self.trunk + self.last_stage + self.head


def vt_resnet_macs(config: VTResNetConfig) -> VTResNetMacs:
    size, trunk = config.img_size, config.trunk
    front = trunk_macs(trunk, config.in_chans, size, size, stages=3)
    if config.family == "resnet":
        side = trunk.stage_sizes(size)[2]
        last = stage_macs(trunk, 3, trunk.stage_channels[2], (side, side))
        last += trunk.stage_sizes(size)[3] ** 2 * trunk.stage_channels[3]  # adaptive average pool
    else:
        positions, channels, vt = config.feature_size**2, config.feature_channels, config.vt
        last = 0
        for index in range(config.vt_modules):
            last += tokenizer_macs(vt, positions, channels, recurrent=index > 0)
            last += transformer_macs(vt, vt.tokens)
            if index < config.vt_modules - 1:
                last += projector_macs(vt, positions, channels, vt.tokens)
    return VTResNetMacs(trunk=front, last_stage=last, head=config.head_features * config.num_classes)


@dataclass(frozen=True)
class FPNMacs:
    """Multiply-adds of a VT-FPN (or of a standard FPN in its place), by part."""

    trunk: int
    lateral: int  # 1x1 convolutions to fpn_channels, one per level
    fpn_rest: int  # VT: tokenizers, transformer, projectors; standard FPN: 3x3 output convolutions
    head: int

    @property
    def fpn_module(self) -> int:
        return self.lateral + self.fpn_rest

    @property
    def total(self) -> int:
        return self.trunk + self.fpn_module + self.head


def _fpn_common(config: VTFPNConfig, img_size: tuple[int, int] | None) -> tuple[tuple[tuple[int, int], ...], int, int]:
    height, width = img_size or config.img_size
    sizes = config.level_sizes((height, width))
    trunk = trunk_macs(config.trunk, config.in_chans, height, width, stages=4)
    lateral = sum(
        _conv(h, w, cin, config.fpn_channels, 1) for (h, w), cin in zip(sizes, config.trunk.stage_channels)
    )
    return sizes, trunk, lateral


def vt_fpn_macs(config: VTFPNConfig, img_size: tuple[int, int] | None = None) -> FPNMacs:
    """VT-FPN at `img_size` (default: the config's), with its segmentation head."""
    sizes, trunk, lateral = _fpn_common(config, img_size)
    vt, channels = config.vt, config.fpn_channels
    all_tokens = vt.tokens * config.num_levels
    read_back = vt.tokens if config.projector_tokens == "own_level" else all_tokens
    rest = transformer_macs(vt, all_tokens)
    for h, w in sizes:
        rest += tokenizer_macs(vt, h * w, channels, recurrent=False)
        rest += projector_macs(vt, h * w, channels, read_back)
    finest = sizes[0][0] * sizes[0][1]
    head = (config.num_levels - 1) * finest * channels  # nearest upsampling of the coarser levels
    head += finest * channels * config.num_classes  # 1x1 classifier
    return FPNMacs(trunk=trunk, lateral=lateral, fpn_rest=rest, head=head)


def standard_fpn_macs(config: VTFPNConfig, img_size: tuple[int, int] | None = None) -> FPNMacs:
    """The same network with a standard FPN module (lateral 1x1 and output 3x3 convolutions, fpn_channels wide)."""
    sizes, trunk, lateral = _fpn_common(config, img_size)
    outputs = sum(_conv(h, w, config.fpn_channels, config.fpn_channels, 3) for h, w in sizes)
    head = vt_fpn_macs(config, img_size).head
    return FPNMacs(trunk=trunk, lateral=lateral, fpn_rest=outputs, head=head)


def vt_total_macs(config: VTResNetConfig | VTFPNConfig) -> int:
    if isinstance(config, VTFPNConfig):
        return vt_fpn_macs(config).total
    return vt_resnet_macs(config).total


def vt_gflops(config: VTResNetConfig | VTFPNConfig) -> tuple[float]:
    """GFLOPs (10^9 multiply-adds) of the single exit, the unit of the paper's tables."""
    return (vt_total_macs(config) / 1e9,)
