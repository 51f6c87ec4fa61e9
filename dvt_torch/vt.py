"""Visual Transformer (VT) in PyTorch: tokenizers, transformer, projector, VT-ResNet, VT-FPN.

Feature maps travel between VT layers as (B, HW, C): X of the paper, one row per
position. Every softmax names its axis. The ResNet trunks are timm's own blocks
(`timm.models.resnet.make_blocks`) under timm's key layout, so a timm ResNet's
`conv1`..`layer3` weights load unchanged. Every width comes from a `dvt_shared.vt` config.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, register_notrace_function, trunc_normal_
from timm.models._features import feature_take_indices  # as timm's own models import it
from timm.models.resnet import BasicBlock, Bottleneck, make_blocks
from torch import nn

from dvt_shared.image_checks import check_image_dtype, check_image_shape
from dvt_shared.vt import STEM_GEOMETRY, ResNetSpec, VTFPNConfig, VTResNetConfig, VTSpec
from dvt_shared.vt_model import ResNetModel, TrunkModel, VTFPNModel, VTResNetModel

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free weight matrix, as every VT equation has; truncated normal (std 0.02) like ViT's."""
    layer = nn.Linear(in_features, out_features, bias=False)
    trunc_normal_(layer.weight, std=0.02)
    return layer


def to_positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW, C): a transpose of the flattened map, not a reshape, which would mix channels."""
    return x.flatten(2).transpose(1, 2)


def to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, HW, C) -> (B, C, H, W), the inverse of to_positions."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


class FilterTokenizer(nn.Module):
    """T = softmax_HW(X W_A)^T X, then the value projection C -> C_T when the widths differ.

    The projection is applied to the L tokens rather than to the HW positions before the
    average: the result is the same, (A^T X) W_V = A^T (X W_V), at a fraction of the cost.
    """

    def __init__(self, channels: int, vt: VTSpec):
        super().__init__()
        self.attention = _linear(channels, vt.tokens)  # W_A
        self.value = _linear(channels, vt.token_dim) if vt.projects_values(channels) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.attention(x), dim=1)  # (B, HW, L), each token's weights over the positions
        tokens = attention.transpose(1, 2) @ x
        return self.value(tokens) if self.value is not None else tokens


class RecurrentTokenizer(nn.Module):
    """W_R = T_in W_{T->R} (one C-wide filter per token), T = softmax_HW(X W_R^T)^T X, then the value projection."""

    def __init__(self, channels: int, vt: VTSpec):
        super().__init__()
        self.token_to_filter = _linear(vt.token_dim, channels)  # W_{T->R}
        self.value = _linear(channels, vt.token_dim) if vt.projects_values(channels) else None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        filters = self.token_to_filter(tokens)  # (B, L, C)
        attention = torch.softmax(x @ filters.transpose(1, 2), dim=1)  # (B, HW, L), over the positions
        tokens = attention.transpose(1, 2) @ x
        return self.value(tokens) if self.value is not None else tokens


class VTTransformer(nn.Module):
    """T' = T + softmax_L((T K)(T Q)^T) T, T_out = T' + ReLU(T' F1) F2.

    Row i of (T K)(T Q)^T scores every token j for token i; the softmax runs over j, the
    last axis, so that token i receives a weighted average of the tokens.
    """

    def __init__(self, vt: VTSpec):
        super().__init__()
        self.key = _linear(vt.token_dim, vt.qk_dim)
        self.query = _linear(vt.token_dim, vt.qk_dim)
        self.ff1 = _linear(vt.token_dim, vt.mlp_hidden)
        self.ff2 = _linear(vt.mlp_hidden, vt.token_dim)
        self.scale = vt.scale(vt.qk_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = (self.key(tokens) @ self.query(tokens).transpose(1, 2)) * self.scale
        tokens = tokens + torch.softmax(logits, dim=-1) @ tokens
        return tokens + self.ff2(torch.relu(self.ff1(tokens)))


class Projector(nn.Module):
    """X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T, with the value projection C_T -> C when the widths differ.

    (X W_Q)(T W_K)^T is evaluated as X (T W_K W_Q^T)^T: L filters of width C, then one
    product per position, instead of mapping every position through W_Q. The two are
    equal; the second costs HW*C*L instead of HW*C*d multiply-adds.
    """

    def __init__(self, channels: int, vt: VTSpec):
        super().__init__()
        qk_dim = vt.projector_qk_dim(channels)
        self.query = _linear(channels, qk_dim)  # W_Q, used through its weight (see the class docstring)
        self.key = _linear(vt.token_dim, qk_dim)
        self.value = _linear(vt.token_dim, channels) if vt.projects_values(channels) else None
        self.scale = vt.scale(qk_dim)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        filters = self.key(tokens) @ self.query.weight  # (B, L, C)
        attention = torch.softmax((x @ filters.transpose(1, 2)) * self.scale, dim=-1)  # (B, HW, L), over the tokens
        values = self.value(tokens) if self.value is not None else tokens
        return x + attention @ values


class VTModule(nn.Module):
    """Tokenizer (filter-based first, recurrent after), transformer, and a projector unless its output would go
    unused."""

    def __init__(self, channels: int, vt: VTSpec, recurrent: bool, project: bool):
        super().__init__()
        self.recurrent = recurrent
        self.tokenizer = RecurrentTokenizer(channels, vt) if recurrent else FilterTokenizer(channels, vt)
        self.transformer = VTTransformer(vt)
        self.projector = Projector(channels, vt) if project else None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(x, tokens) if self.recurrent else self.tokenizer(x)
        tokens = self.transformer(tokens)
        if self.projector is not None:
            x = self.projector(x, tokens)
        return x, tokens


def resnet_trunk(trunk: ResNetSpec, in_chans: int, stages: int) -> list[tuple[str, nn.Module]]:
    """(name, module) of the stem and the first `stages` stages, initialised as timm's ResNet is."""
    (kernel, stride, padding), pool = STEM_GEOMETRY[trunk.stem]
    norm = partial(nn.BatchNorm2d, eps=trunk.batchnorm_eps, momentum=trunk.batchnorm_momentum)
    block = _BLOCKS[trunk.block]
    layers, _ = make_blocks(
        (block,) * stages, trunk.channels[:stages], trunk.layers[:stages], inplanes=trunk.stem_width, norm_layer=norm,
    )
    modules = [
        ("conv1", nn.Conv2d(in_chans, trunk.stem_width, kernel, stride=stride, padding=padding, bias=False)),
        ("bn1", norm(trunk.stem_width)),
        ("act1", nn.ReLU(inplace=True)),
        ("maxpool", nn.MaxPool2d(*pool) if pool else nn.Identity()),
        *layers,
    ]
    for _, module in modules:
        for part in module.modules():
            if isinstance(part, nn.Conv2d):
                nn.init.kaiming_normal_(part.weight, mode="fan_out", nonlinearity="relu")
            if hasattr(part, "zero_init_last"):
                part.zero_init_last()
    return modules


# A leaf call when torch.fx traces a model (timm's feature extraction): it runs on the real batch then.
@register_notrace_function
def check_vt_images(x: torch.Tensor, config: VTResNetConfig | VTFPNConfig) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    check_image_shape(x.shape, config)
    check_image_dtype(x.dtype, x.is_floating_point())


class _Trunk(TrunkModel, nn.Module):
    """The ResNet trunk every VT model starts with, and what timm's model contract computes on it."""

    def __init__(self, config: VTResNetConfig | VTFPNConfig):
        super().__init__()
        self._set_trunk(config)
        for name, module in resnet_trunk(config.trunk, config.in_chans, self.trunk_stages):
            self.add_module(name, module)
        self.kept_stages = self.trunk_stages  # fewer after prune_intermediate_layers

    def _like_trunk(self, module: nn.Module) -> nn.Module:
        """`module`, a new head part, on the trunk's device and dtype and in the model's training mode."""
        weight = self.conv1.weight
        return module.to(device=weight.device, dtype=weight.dtype).train(self.training)

    def run_trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every kept stage's output (the stem's alone, pruned to the stem)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        outputs = [] if self.kept_stages else [x]
        for index in range(1, self.kept_stages + 1):
            x = getattr(self, f"layer{index}")(x)
            outputs.append(x)
        return outputs

    def features(self, stages: list[torch.Tensor]):
        """`features_of_stages` (the model's own); a trunk pruned short of its last stage has lost what the
        VT modules or the FPN read, and its features are the last kept map."""
        return self.features_of_stages(stages) if self.kept_stages == self.trunk_stages else stages[-1]

    def forward_features(self, x: torch.Tensor):
        """The model's features of every kept trunk stage, after the input checks."""
        check_vt_images(x, self.config)
        return self.features(self.run_trunk(x))

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's pruning to a feature backbone: the trunk stages after the last map in `indices` go (to the
        stem: its max pool too), and with them whatever reads them (VT modules, the FPN). `prune_head`
        replaces the classifier with an identity (and the pool with none); it is required once stages go,
        since the head reads what was cut. The trunk has no norm (`prune_norm` changes nothing). Returns
        the absolute indices to take."""
        take, last = feature_take_indices(len(self.feature_info), indices)
        if last < self.kept_stages:
            if not prune_head:
                raise ValueError(
                    f"{self.config.name}: pruning to feature {last} cuts layer{last + 1}.. and the head that reads "
                    "them; pass prune_head=True"
                )
            for index in range(last + 1, self.kept_stages + 1):
                delattr(self, f"layer{index}")
            if last == 0:
                self.maxpool = nn.Identity()
            self.kept_stages = last
            self.feature_info = self.feature_info[: last + 1]
            self._drop_neck()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False, stop_early: bool = False,
        output_fmt: str = "NCHW", intermediates_only: bool = False,
    ):
        """timm's feature-getter interface (`features_only=True, feature_cls="getter"`): the trunk's maps
        named by `feature_info` (the stem's activation, then each stage), and `forward_features`' output.

        `indices`: all maps (None), the last n (an int) or those listed. The trunk has no norm layer to
        apply (`norm` changes nothing). With `intermediates_only` the stages after the last map taken
        are skipped (`stop_early` or not); otherwise every stage runs, since `forward_features` needs them all.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{self.config.name}: the trunk's maps are NCHW, got output_fmt={output_fmt!r}")
        check_vt_images(x, self.config)
        take, last = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take else []
        x = self.maxpool(x)
        stages = [] if self.kept_stages else [x]
        for index in range(1, self.kept_stages + 1):
            if intermediates_only and index > last:
                break
            x = getattr(self, f"layer{index}")(x)
            stages.append(x)
            if index in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.features(stages), intermediates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return self.forward_head(features) if self.kept_stages == self.trunk_stages else features

    def _drop_neck(self) -> None:
        """Remove the layers between the trunk and the classifier, which read the trunk's last stages."""


class ResNet(ResNetModel, _Trunk):
    """The plain ResNet of a trunk: timm's ResNet keys and computation (average pool, `fc`)."""

    def __init__(self, config: VTResNetConfig):
        super().__init__(config)
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = self._new_classifier(config.num_classes)

    def _choose_global_pool(self, global_pool: str | None) -> None:
        """Any pool type of timm's `SelectAdaptivePool2d` ("avg", "max", ...) as timm's ResNet takes; ""
        keeps the feature map."""
        if global_pool is not None:
            self.global_pool = self._like_trunk(SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool)))

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return self._like_trunk(nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity())

    def features_of_stages(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """layer4's feature map (B, C, H, W): `forward_features`' output."""
        return stages[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)


class VTResNet(VTResNetModel, _Trunk):
    """A ResNet's first three stages, VT modules at the third stage's resolution, and a
    head that averages the last module's tokens and applies a linear map."""

    def __init__(self, config: VTResNetConfig):
        super().__init__(config)
        channels, count = config.feature_channels, config.vt_modules
        self.vt = nn.ModuleList(
            VTModule(channels, config.vt, recurrent=i > 0, project=i < count - 1) for i in range(count)
        )
        self.head = self._new_classifier(config.num_classes)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        head = nn.Identity()
        if num_classes:
            head = nn.Linear(self.num_features, num_classes)
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        return self._like_trunk(head)

    def _drop_neck(self) -> None:
        self.vt = nn.ModuleList()

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last module's tokens (B, L, C_T)."""
        return self.features_of_stages(self.run_trunk(x))

    def features_of_stages(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """The last module's tokens (B, L, C_T) of layer3's map: `forward_features`' output."""
        features, tokens = to_positions(stages[-1]), None
        for module in self.vt:
            features, tokens = module(features, tokens)
        return tokens

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The tokens' average (global_pool "avg"; "" keeps every token), then the linear head."""
        x = tokens.mean(dim=1) if self.global_pool == "avg" else tokens
        return x if pre_logits else self.head(x)


class VTFPN(VTFPNModel, _Trunk):
    """ResNet trunk, FPN lateral 1x1 convolutions, VT in place of the FPN's output convolutions.

    `model(x)` returns per-pixel logits at stride 4; `forward_features(x)` returns the four
    FPN outputs (B, fpn_channels, h, w), finest first, and `forward_head(levels)` the logits.
    """

    def __init__(self, config: VTFPNConfig):
        super().__init__(config)
        channels, vt = config.fpn_channels, config.vt
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in config.trunk.stage_channels)
        self.tokenizers = nn.ModuleList(FilterTokenizer(channels, vt) for _ in range(config.num_levels))
        self.transformer = VTTransformer(vt)
        self.projectors = nn.ModuleList(Projector(channels, vt) for _ in range(config.num_levels))
        self.classifier = self._new_classifier(config.num_classes)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return self._like_trunk(nn.Conv2d(self.num_features, num_classes, 1) if num_classes else nn.Identity())

    def _drop_neck(self) -> None:
        self.lateral, self.tokenizers, self.projectors = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.transformer = nn.Identity()

    def features_of_stages(self, stages: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The four FPN outputs (B, fpn_channels, h, w) of layer1..layer4's maps, finest first:
        `forward_features`' output."""
        maps = [lateral(f) for lateral, f in zip(self.lateral, stages)]
        positions = [to_positions(m) for m in maps]
        tokens = self.transformer(torch.cat([tok(p) for tok, p in zip(self.tokenizers, positions)], dim=1))
        # Slices and sizes by index, not `tokens.split` or `*m.shape[-2:]`: torch.fx traces a fixed
        # number of those, while iterating a traced value fails.
        count = self.config.vt.tokens
        if self.config.projector_tokens == "own_level":
            level_tokens = [tokens[:, level * count:(level + 1) * count] for level in range(self.config.num_levels)]
        else:
            level_tokens = [tokens] * self.config.num_levels
        return tuple(
            to_map(projector(p, t), m.shape[-2], m.shape[-1])
            for projector, p, t, m in zip(self.projectors, positions, level_tokens, maps)
        )

    def forward_head(self, levels: tuple[torch.Tensor, ...], pre_logits: bool = False) -> torch.Tensor:
        """The levels summed at the finest one's size (nearest upsampling), then the 1x1 classifier."""
        finest = levels[0].shape[-2:]
        merged = levels[0]
        for level in levels[1:]:
            merged = merged + F.interpolate(level, size=finest, mode="nearest")
        return merged if pre_logits else self.classifier(merged)


def exit_logits(outputs) -> tuple[torch.Tensor, ...]:
    """A model's outputs as per-exit logits: DVT's tuple as it is, a classifier's one tensor as a 1-tuple."""
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
