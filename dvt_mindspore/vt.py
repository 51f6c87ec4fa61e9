"""Visual Transformer (VT) in MindSpore, the mirror image of `dvt_torch.vt`.

Attribute names equal the PyTorch module names, and the ResNet trunk is built to timm's
key layout (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, ...), so weights
convert both ways by name; BatchNorm's parameters are MindSpore's gamma/beta/moving_mean/
moving_variance (mapped in `convert.py`) and its momentum is 1 - PyTorch's. `construct`
is plain enough for graph mode; input checks run in Python before it.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import HeNormal, TruncatedNormal

from dvt_shared.image_checks import check_image_dtype, check_image_shape
from dvt_shared.vt import STEM_GEOMETRY, ResNetSpec, VTFPNConfig, VTResNetConfig, VTSpec
from dvt_shared.vt_model import ResNetModel, TrunkModel, VTFPNModel, VTResNetModel

from .layers import UnfoldConv2d, batch_matmul, forget_compiled_graphs, matmul_last

_FLOAT_DTYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


def _linear(in_features: int, out_features: int) -> nn.Dense:
    """A bias-free weight matrix, as every VT equation has; truncated normal (std 0.02) like ViT's."""
    return nn.Dense(in_features, out_features, weight_init=TruncatedNormal(sigma=0.02), has_bias=False)


def to_positions(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW, C): a transpose of the flattened map, not a reshape, which would mix channels."""
    return x.reshape(x.shape[0], x.shape[1], -1).swapaxes(1, 2)


def to_map(x: Tensor, height: int, width: int) -> Tensor:
    """(B, HW, C) -> (B, C, H, W), the inverse of to_positions."""
    return x.swapaxes(1, 2).reshape(x.shape[0], x.shape[2], height, width)


class FilterTokenizer(nn.Cell):
    """T = softmax_HW(X W_A)^T X, then the value projection C -> C_T when the widths differ (applied to the tokens)."""

    def __init__(self, channels: int, vt: VTSpec):
        super().__init__()
        self.attention = _linear(channels, vt.tokens)
        self.value = _linear(channels, vt.token_dim) if vt.projects_values(channels) else None

    def construct(self, x):
        attention = ops.softmax(self.attention(x), axis=1)  # (B, HW, L), each token's weights over the positions
        tokens = batch_matmul(attention.swapaxes(1, 2), x)
        if self.value is not None:
            tokens = self.value(tokens)
        return tokens


class RecurrentTokenizer(nn.Cell):
    """W_R = T_in W_{T->R} (one C-wide filter per token), T = softmax_HW(X W_R^T)^T X, then the value projection."""

    def __init__(self, channels: int, vt: VTSpec):
        super().__init__()
        self.token_to_filter = _linear(vt.token_dim, channels)
        self.value = _linear(channels, vt.token_dim) if vt.projects_values(channels) else None

    def construct(self, x, tokens):
        filters = self.token_to_filter(tokens)
        attention = ops.softmax(batch_matmul(x, filters, transpose_b=True), axis=1)  # over the positions
        tokens = batch_matmul(attention.swapaxes(1, 2), x)
        if self.value is not None:
            tokens = self.value(tokens)
        return tokens


class VTTransformer(nn.Cell):
    """T' = T + softmax_L((T K)(T Q)^T) T over the last axis (the tokens averaged), T_out = T' + ReLU(T' F1) F2."""

    def __init__(self, vt: VTSpec):
        super().__init__()
        self.key = _linear(vt.token_dim, vt.qk_dim)
        self.query = _linear(vt.token_dim, vt.qk_dim)
        self.ff1 = _linear(vt.token_dim, vt.mlp_hidden)
        self.ff2 = _linear(vt.mlp_hidden, vt.token_dim)
        self.scale = vt.scale(vt.qk_dim)

    def construct(self, tokens):
        logits = batch_matmul(self.key(tokens), self.query(tokens), transpose_b=True) * self.scale
        tokens = tokens + batch_matmul(ops.softmax(logits, axis=-1), tokens)
        return tokens + self.ff2(ops.relu(self.ff1(tokens)))


class Projector(nn.Cell):
    """X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T, evaluated as X (T W_K W_Q^T)^T like the PyTorch twin."""

    def __init__(self, channels: int, vt: VTSpec):
        super().__init__()
        qk_dim = vt.projector_qk_dim(channels)
        self.query = _linear(channels, qk_dim)
        self.key = _linear(vt.token_dim, qk_dim)
        self.value = _linear(vt.token_dim, channels) if vt.projects_values(channels) else None
        self.scale = vt.scale(qk_dim)

    def construct(self, x, tokens):
        filters = matmul_last(self.key(tokens), self.query.weight)  # (B, L, C)
        attention = ops.softmax(batch_matmul(x, filters, transpose_b=True) * self.scale, axis=-1)  # over the tokens
        values = tokens
        if self.value is not None:
            values = self.value(tokens)
        return x + batch_matmul(attention, values)


class VTModule(nn.Cell):
    """Tokenizer (filter-based first, recurrent after), transformer, and a projector unless its output would go
    unused."""

    def __init__(self, channels: int, vt: VTSpec, recurrent: bool, project: bool):
        super().__init__()
        self.recurrent = recurrent
        self.tokenizer = RecurrentTokenizer(channels, vt) if recurrent else FilterTokenizer(channels, vt)
        self.transformer = VTTransformer(vt)
        self.projector = Projector(channels, vt) if project else None

    def construct(self, x, tokens):
        if self.recurrent:
            tokens = self.tokenizer(x, tokens)
        else:
            tokens = self.tokenizer(x)
        tokens = self.transformer(tokens)
        if self.projector is not None:
            x = self.projector(x, tokens)
        return x, tokens


# ---------------------------------------------------------------- ResNet trunk (timm's layout)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False) -> nn.Conv2d:
    # MindSpore defaults to pad_mode="same" and no bias: both stated, as PyTorch's Conv2d behaves.
    return UnfoldConv2d(
        cin, cout, kernel, stride, padding, bias, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
    )


def _batch_norm(channels: int, trunk: ResNetSpec, zero: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(
        channels, eps=trunk.batchnorm_eps, momentum=1.0 - trunk.batchnorm_momentum,
        gamma_init="zeros" if zero else "ones",
    )


class BasicBlock(nn.Cell):
    """timm's BasicBlock: 3x3 (strided) and 3x3 convolutions, BatchNorm, ReLU, residual."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample, trunk: ResNetSpec):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride, 1)
        self.bn1 = _batch_norm(planes, trunk)
        self.act1 = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3, 1, 1)
        self.bn2 = _batch_norm(planes, trunk, zero=True)  # timm's zero_init_last
        self.act2 = nn.ReLU()
        self.downsample = downsample

    def construct(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(x + shortcut)


class Bottleneck(nn.Cell):
    """timm's Bottleneck (ResNet v1.5): 1x1, 3x3 (strided), 1x1 to four times the width."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample, trunk: ResNetSpec):
        super().__init__()
        outplanes = planes * trunk.expansion
        self.conv1 = _conv(inplanes, planes, 1)
        self.bn1 = _batch_norm(planes, trunk)
        self.act1 = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3, stride, 1)
        self.bn2 = _batch_norm(planes, trunk)
        self.act2 = nn.ReLU()
        self.conv3 = _conv(planes, outplanes, 1)
        self.bn3 = _batch_norm(outplanes, trunk, zero=True)
        self.act3 = nn.ReLU()
        self.downsample = downsample

    def construct(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def resnet_trunk(trunk: ResNetSpec, in_chans: int, stages: int) -> list[tuple[str, nn.Cell]]:
    """(name, cell) of the stem and the first `stages` stages, as timm's make_blocks lays them out."""
    (kernel, stride, padding), pool = STEM_GEOMETRY[trunk.stem]
    cells = [
        ("conv1", _conv(in_chans, trunk.stem_width, kernel, stride, padding)),
        ("bn1", _batch_norm(trunk.stem_width, trunk)),
        ("act1", nn.ReLU()),
        ("maxpool", nn.MaxPool2d(pool[0], pool[1], pad_mode="pad", padding=pool[2]) if pool else nn.Identity()),
    ]
    block, inplanes = _BLOCKS[trunk.block], trunk.stem_width
    for index in range(stages):
        planes, outplanes = trunk.channels[index], trunk.stage_channels[index]
        stride = 1 if index == 0 else 2
        downsample = None
        if stride != 1 or inplanes != outplanes:
            downsample = nn.SequentialCell([_conv(inplanes, outplanes, 1, stride), _batch_norm(outplanes, trunk)])
        blocks = [block(inplanes, planes, stride, downsample, trunk)]
        blocks += [block(outplanes, planes, 1, None, trunk) for _ in range(trunk.layers[index] - 1)]
        cells.append((f"layer{index + 1}", nn.SequentialCell(blocks)))
        inplanes = outplanes
    return cells


class _Trunk(TrunkModel, nn.Cell):
    """The ResNet trunk every VT model starts with, and what timm's model contract computes on it."""

    def __init__(self, config: VTResNetConfig | VTFPNConfig):
        super().__init__()
        self._set_trunk(config)
        for name, cell in resnet_trunk(config.trunk, config.in_chans, self.trunk_stages):
            setattr(self, name, cell)
        self.stage_names = tuple(f"layer{i}" for i in range(1, self.trunk_stages + 1))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        forget_compiled_graphs(self)  # graph mode would run the old classifier otherwise

    def check_images(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a mindspore.Tensor, got {type(x).__name__}")
        check_image_shape(x.shape, self.config)
        check_image_dtype(x.dtype, x.dtype in _FLOAT_DTYPES)

    def forward_features(self, x: Tensor):
        self.check_images(x)
        return self.features(x)

    def construct(self, x):
        return self.forward_head(self.features(x))

    @property
    def dtype(self):
        return self.conv1.weight.dtype

    def run_trunk(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        outputs = ()
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs = outputs + (x,)
        return outputs

    def __call__(self, x):
        # Checked here, in Python, so that graph mode compiles only the model itself.
        self.check_images(x)
        return super().__call__(x)


class ResNet(ResNetModel, _Trunk):
    """The plain ResNet of a trunk: timm's ResNet keys and computation (average pool, `fc`)."""

    def __init__(self, config: VTResNetConfig):
        super().__init__(config)
        self.global_pool = "avg"
        self.fc = self._new_classifier(config.num_classes)

    def _new_classifier(self, num_classes: int) -> nn.Cell:
        return nn.Dense(self.num_features, num_classes) if num_classes else nn.Identity()

    def features(self, x):
        """layer4's feature map (B, C, H, W)."""
        return self.run_trunk(x)[-1]

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(axis=(2, 3))
        if pre_logits:
            return x
        return self.fc(x)


class VTResNet(VTResNetModel, _Trunk):
    """A ResNet's first three stages, VT modules at the third stage's resolution, and a
    head that averages the last module's tokens and applies a linear map."""

    def __init__(self, config: VTResNetConfig):
        super().__init__(config)
        channels, count = config.feature_channels, config.vt_modules
        self.vt = nn.CellList(
            [VTModule(channels, config.vt, recurrent=i > 0, project=i < count - 1) for i in range(count)]
        )
        self.head = self._new_classifier(config.num_classes)

    def _new_classifier(self, num_classes: int) -> nn.Cell:
        if not num_classes:
            return nn.Identity()
        return nn.Dense(self.num_features, num_classes, weight_init=TruncatedNormal(sigma=0.02), bias_init="zeros")

    def features(self, x):
        """The last module's tokens (B, L, C_T)."""
        features = to_positions(self.run_trunk(x)[-1])
        tokens = None
        for module in self.vt:
            features, tokens = module(features, tokens)
        return tokens

    def forward_head(self, tokens, pre_logits: bool = False):
        """The tokens' average (global_pool "avg"; "" keeps every token), then the linear head."""
        x = tokens
        if self.global_pool == "avg":
            x = tokens.mean(axis=1)
        if pre_logits:
            return x
        return self.head(x)


class VTFPN(VTFPNModel, _Trunk):
    """ResNet trunk, FPN lateral 1x1 convolutions, VT in place of the FPN's output convolutions.

    `model(x)` returns per-pixel logits at stride 4, `forward_features(x)` the four FPN
    outputs and `forward_head(levels)` the logits, as the PyTorch twin does.
    """

    def __init__(self, config: VTFPNConfig):
        super().__init__(config)
        channels, vt = config.fpn_channels, config.vt
        self.lateral = nn.CellList([_conv(c, channels, 1, bias=True) for c in config.trunk.stage_channels])
        self.tokenizers = nn.CellList([FilterTokenizer(channels, vt) for _ in range(config.num_levels)])
        self.transformer = VTTransformer(vt)
        self.projectors = nn.CellList([Projector(channels, vt) for _ in range(config.num_levels)])
        self.classifier = self._new_classifier(config.num_classes)
        self.own_level = config.projector_tokens == "own_level"
        self.level_tokens = vt.tokens

    def _new_classifier(self, num_classes: int) -> nn.Cell:
        return _conv(self.num_features, num_classes, 1, bias=True) if num_classes else nn.Identity()

    def features(self, x):
        """The four FPN outputs (B, fpn_channels, h, w), finest first."""
        features = self.run_trunk(x)
        maps = ()
        tokens = ()
        for index in range(len(features)):
            lateral = self.lateral[index](features[index])
            maps = maps + (lateral,)
            tokens = tokens + (self.tokenizers[index](to_positions(lateral)),)
        tokens = self.transformer(ops.cat(tokens, axis=1))
        levels = ()
        for index in range(len(maps)):
            height, width = maps[index].shape[2], maps[index].shape[3]
            level_tokens = tokens
            if self.own_level:
                level_tokens = tokens[:, index * self.level_tokens:(index + 1) * self.level_tokens]
            projected = self.projectors[index](to_positions(maps[index]), level_tokens)
            levels = levels + (to_map(projected, height, width),)
        return levels

    def forward_head(self, levels, pre_logits: bool = False):
        """The levels summed at the finest one's size (nearest upsampling), then the 1x1 classifier."""
        finest = (levels[0].shape[2], levels[0].shape[3])
        merged = levels[0]
        for level in levels[1:]:
            merged = merged + ops.interpolate(level, size=finest, mode="nearest")
        if pre_logits:
            return merged
        return self.classifier(merged)


def exit_logits(outputs) -> tuple[Tensor, ...]:
    """A model's outputs as per-exit logits: DVT's tuple as it is, a classifier's one tensor as a 1-tuple."""
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
