"""The canonical key -> shape layout of every model, computed from its config alone.

Both backends' state dicts are tested against it, so weights can be checked (every missing,
unexpected and mis-shaped tensor named) without building a model in any framework.
"""
from __future__ import annotations

from .configs import DVTConfig
from .vt import STEM_GEOMETRY, ResNetSpec, VTFPNConfig, VTResNetConfig, VTSpec

Layout = dict[str, tuple[int, ...]]
# (classifier, first convolution): the layers timm's `pretrained_cfg` names; a DVT has one of each per exit.
LayerNames = tuple[str | tuple[str, ...], str | tuple[str, ...]]


def _linear(prefix: str, in_features: int, out_features: int, bias: bool = True) -> Layout:
    layout = {f"{prefix}.weight": (out_features, in_features)}
    if bias:
        layout[f"{prefix}.bias"] = (out_features,)
    return layout


def _layer_norm(prefix: str, width: int) -> Layout:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _conv(prefix: str, in_channels: int, out_channels: int, kernel: int, bias: bool) -> Layout:
    layout = {f"{prefix}.weight": (out_channels, in_channels, kernel, kernel)}
    if bias:
        layout[f"{prefix}.bias"] = (out_channels,)
    return layout


# ---------------------------------------------------------------- DVT


def _performer(prefix: str, dim: int, config: DVTConfig) -> Layout:
    emb = config.token_dim
    return {
        f"{prefix}.w": (config.performer_features, emb),
        **_linear(f"{prefix}.kqv", dim, 3 * emb),
        **_linear(f"{prefix}.proj", emb, emb),
        **_layer_norm(f"{prefix}.norm1", dim),
        **_layer_norm(f"{prefix}.norm2", emb),
        **_linear(f"{prefix}.mlp.0", emb, emb),
        **_linear(f"{prefix}.mlp.2", emb, emb),
    }


def _stem(prefix: str, config: DVTConfig, index: int) -> Layout:
    stem = config.stages[index].stem
    if stem.kind == "patch":
        kernel = stem.splits[0][0]
        return _conv(f"{prefix}.patch_embed.proj", config.in_chans, config.embed_dim, kernel, bias=True)
    widths = config.stem_widths(index)
    layout: Layout = {}
    for i, width in enumerate(widths[:-1], start=1):
        layout.update(_performer(f"{prefix}.tokens_to_token.attention{i}", width, config))
    layout.update(_linear(f"{prefix}.tokens_to_token.project", widths[-1], config.embed_dim))
    return layout


def _block(prefix: str, config: DVTConfig, index: int) -> Layout:
    dim, mlp_in = config.embed_dim, config.mlp_in(index)
    layout = {
        **_layer_norm(f"{prefix}.norm1", dim),
        **_linear(f"{prefix}.attn.qkv", dim, 3 * dim, bias=config.qkv_bias),
        **_linear(f"{prefix}.attn.proj", dim, dim),
        **_layer_norm(f"{prefix}.norm2", mlp_in),
        **_linear(f"{prefix}.mlp.fc1", mlp_in, config.mlp_hidden),
        **_linear(f"{prefix}.mlp.fc2", config.mlp_hidden, dim),
    }
    if config.stage_reuses(index)[0]:
        reuse = f"{prefix}.feature_resuse_mlp"  # the release's spelling
        layout.update(_layer_norm(f"{reuse}.0", dim))
        layout.update(_linear(f"{reuse}.1.fc1", dim, config.reuse_hidden))
        layout.update(_linear(f"{reuse}.1.fc2", config.reuse_hidden, config.reuse_dim))
    return layout


def dvt_layout(config: DVTConfig) -> Layout:
    """Release state-dict keys and shapes of the cascade `config` describes, in the models' order."""
    layout: Layout = {}
    dim = config.embed_dim
    for index, stage in enumerate(config.stages):
        prefix = stage.name
        layout[f"{prefix}.cls_token"] = (1, 1, dim)
        layout[f"{prefix}.pos_embed"] = (1, config.num_tokens[index], dim)
        layout.update(_stem(prefix, config, index))
        for block in range(config.depth):
            layout.update(_block(f"{prefix}.blocks.{block}", config, index))
        layout.update(_layer_norm(f"{prefix}.norm", dim))
        if config.stage_reuses(index)[1]:
            channels, hidden = config.relation_channels, config.relation_hidden
            layout.update(_conv(f"{prefix}.relation_reuse_conv.0", channels, hidden, 1, bias=True))
            layout.update(_conv(f"{prefix}.relation_reuse_conv.2", hidden, channels, 1, bias=True))
        layout.update(_linear(f"{prefix}.head", dim, config.num_classes))
    return layout


def dvt_layer_names(config: DVTConfig) -> LayerNames:
    stages = tuple(stage.name for stage in config.stages)
    first = tuple(
        "tokens_to_token.attention1.kqv" if stage.stem.kind == "t2t" else "patch_embed.proj" for stage in config.stages
    )
    return tuple(f"{name}.head" for name in stages), tuple(f"{name}.{layer}" for name, layer in zip(stages, first))


# ---------------------------------------------------------------- VT


def _batchnorm(prefix: str, channels: int) -> Layout:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}


def _residual_block(prefix: str, trunk: ResNetSpec, in_channels: int, width: int, stride: int) -> Layout:
    """timm's BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3, 1x1), with a 1x1 downsample where the shape changes."""
    out_channels = width * trunk.expansion
    if trunk.block == "basic":
        convs = ((in_channels, width, 3), (width, width, 3))
    else:
        convs = ((in_channels, width, 1), (width, width, 3), (width, out_channels, 1))
    layout: Layout = {}
    for i, (cin, cout, kernel) in enumerate(convs, start=1):
        layout.update(_conv(f"{prefix}.conv{i}", cin, cout, kernel, bias=False))
        layout.update(_batchnorm(f"{prefix}.bn{i}", cout))
    if stride != 1 or in_channels != out_channels:
        layout.update(_conv(f"{prefix}.downsample.0", in_channels, out_channels, 1, bias=False))
        layout.update(_batchnorm(f"{prefix}.downsample.1", out_channels))
    return layout


def _trunk(trunk: ResNetSpec, in_chans: int, stages: int) -> Layout:
    (kernel, _, _), _ = STEM_GEOMETRY[trunk.stem]
    layout = {**_conv("conv1", in_chans, trunk.stem_width, kernel, bias=False), **_batchnorm("bn1", trunk.stem_width)}
    in_channels = trunk.stem_width
    for stage in range(stages):
        for block in range(trunk.layers[stage]):
            stride = 2 if stage > 0 and block == 0 else 1
            layout.update(
                _residual_block(f"layer{stage + 1}.{block}", trunk, in_channels, trunk.channels[stage], stride)
            )
            in_channels = trunk.stage_channels[stage]
    return layout


def _tokenizer(prefix: str, channels: int, vt: VTSpec, recurrent: bool) -> Layout:
    layout = (_linear(f"{prefix}.token_to_filter", vt.token_dim, channels, bias=False) if recurrent
              else _linear(f"{prefix}.attention", channels, vt.tokens, bias=False))
    if vt.projects_values(channels):
        layout.update(_linear(f"{prefix}.value", channels, vt.token_dim, bias=False))
    return layout


def _transformer(prefix: str, vt: VTSpec) -> Layout:
    return {
        **_linear(f"{prefix}.key", vt.token_dim, vt.qk_dim, bias=False),
        **_linear(f"{prefix}.query", vt.token_dim, vt.qk_dim, bias=False),
        **_linear(f"{prefix}.ff1", vt.token_dim, vt.mlp_hidden, bias=False),
        **_linear(f"{prefix}.ff2", vt.mlp_hidden, vt.token_dim, bias=False),
    }


def _projector(prefix: str, channels: int, vt: VTSpec) -> Layout:
    qk_dim = vt.projector_qk_dim(channels)
    layout = {
        **_linear(f"{prefix}.query", channels, qk_dim, bias=False),
        **_linear(f"{prefix}.key", vt.token_dim, qk_dim, bias=False),
    }
    if vt.projects_values(channels):
        layout.update(_linear(f"{prefix}.value", vt.token_dim, channels, bias=False))
    return layout


def vt_resnet_layout(config: VTResNetConfig) -> Layout:
    """timm-style keys and shapes of a VT-ResNet, or of its plain ResNet."""
    if config.family == "resnet":
        return {**_trunk(config.trunk, config.in_chans, 4), **_linear("fc", config.head_features, config.num_classes)}
    layout = _trunk(config.trunk, config.in_chans, 3)
    channels, vt = config.feature_channels, config.vt
    for i in range(config.vt_modules):
        prefix = f"vt.{i}"
        layout.update(_tokenizer(f"{prefix}.tokenizer", channels, vt, recurrent=i > 0))
        layout.update(_transformer(f"{prefix}.transformer", vt))
        if i < config.vt_modules - 1:
            layout.update(_projector(f"{prefix}.projector", channels, vt))
    layout.update(_linear("head", vt.token_dim, config.num_classes))
    return layout


def vt_resnet_layer_names(config: VTResNetConfig) -> LayerNames:
    return ("fc" if config.family == "resnet" else "head"), "conv1"


def vt_fpn_layout(config: VTFPNConfig) -> Layout:
    """Keys and shapes of a VT-FPN: trunk, lateral 1x1 convolutions, tokenizers, transformer, projectors, classifier."""
    layout = _trunk(config.trunk, config.in_chans, 4)
    channels, vt = config.fpn_channels, config.vt
    for i, stage_channels in enumerate(config.trunk.stage_channels):
        layout.update(_conv(f"lateral.{i}", stage_channels, channels, 1, bias=True))
    for i in range(config.num_levels):
        layout.update(_tokenizer(f"tokenizers.{i}", channels, vt, recurrent=False))
    layout.update(_transformer("transformer", vt))
    for i in range(config.num_levels):
        layout.update(_projector(f"projectors.{i}", channels, vt))
    layout.update(_conv("classifier", channels, config.num_classes, 1, bias=True))
    return layout


def vt_fpn_layer_names(config: VTFPNConfig) -> LayerNames:
    return "classifier", "conv1"
