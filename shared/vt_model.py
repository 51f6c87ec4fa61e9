"""The framework-free part of every VT model (plain ResNet, VT-ResNet, VT-FPN), the same in every backend.

Both backends' `ResNet`, `VTResNet` and `VTFPN` inherit the matching class here beside their
framework's module class (`nn.Module`, `nn.Cell`) and add only what computes: the layers, the
forward pass, and `_new_classifier(num_classes)`, a head of their framework (an identity for 0).
"""
from __future__ import annotations

from .data_config import pretrained_cfg
from .models import check_num_classes, family_of
from .vt import STEM_GEOMETRY, ResNetSpec

# The model class that builds each VT family, named when a config of another family reaches one
# (any other family: the facade's `build_model`).
MODEL_CLASSES = {"resnet": "ResNet", "vt_resnet": "VTResNet", "vt_fpn": "VTFPN"}


def feature_info(trunk: ResNetSpec, stages: int) -> list[dict]:
    """timm's feature_info of a trunk: the stem's activation and every stage, in module order (for features_only)."""
    (_, conv_stride, _), pool = STEM_GEOMETRY[trunk.stem]
    stem = conv_stride * (pool[1] if pool else 1)
    return [dict(num_chs=trunk.stem_width, reduction=conv_stride, module="act1")] + [
        dict(num_chs=channels, reduction=stem * 2 ** index, module=f"layer{index + 1}")
        for index, channels in enumerate(trunk.stage_channels[:stages])
    ]


class TrunkModel:
    """The parts of timm's model contract every VT model shares: the config and the attributes it sets
    (`num_classes`, `num_features`, `head_hidden_size`, `pretrained_cfg`, `feature_info`), the classifier
    (`get_classifier`, `reset_classifier`) and `forward_exits`.

    A model class names the config `family` it builds and how many ResNet stages its trunk keeps
    (`trunk_stages`); its classifier is the layer `dvt_shared.layout` names for the family.
    """

    family: str
    trunk_stages: int

    def _set_trunk(self, config) -> None:
        """Record `config` and the attributes it sets; call right after the framework class's `__init__`."""
        if config.family != self.family:
            builder = MODEL_CLASSES.get(config.family, "build_model")
            raise ValueError(f"{config.name} is a {config.family}; build it with {builder}")
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = self.head_hidden_size = config.head_features
        self.pretrained_cfg = pretrained_cfg(config)
        self.feature_info = feature_info(config.trunk, self.trunk_stages)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    @property
    def _classifier_name(self) -> str:
        return family_of(self.config).layer_names(self.config)[0]

    def get_classifier(self):
        return getattr(self, self._classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for `num_classes` (an identity for 0: the model then returns what the classifier
        read); `global_pool` as `_choose_global_pool` takes it."""
        check_num_classes(num_classes)
        self._choose_global_pool(global_pool)
        setattr(self, self._classifier_name, self._new_classifier(num_classes))
        self.num_classes = num_classes

    def _choose_global_pool(self, global_pool: str | None) -> None:
        """reset_classifier's global_pool: "avg", "" (no pooling), or None to keep the current one."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"{self.config.name}: global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool

    def forward_exits(self, x) -> tuple:
        """The model's one output as a 1-tuple, so that code written for DVT's exits takes it unchanged."""
        return (self(x),)


class ResNetModel(TrunkModel):
    """A plain ResNet: the whole trunk, then layer4's map pooled and `fc`."""

    family, trunk_stages = "resnet", 4


class VTResNetModel(TrunkModel):
    """A VT-ResNet: three trunk stages, then tokens, averaged unless global_pool is ""."""

    family, trunk_stages = "vt_resnet", 3
    output_fmt = "NLC"  # forward_features returns tokens (B, L, C_T)

    def _set_trunk(self, config) -> None:
        super()._set_trunk(config)
        self.global_pool = "avg"  # the paper's head averages the tokens


class VTFPNModel(TrunkModel):
    """A VT-FPN: the whole trunk, and per-pixel logits, hence no global pool."""

    family, trunk_stages = "vt_fpn", 4

    def _choose_global_pool(self, global_pool: str | None) -> None:
        if global_pool:
            raise ValueError(f"{self.config.name} predicts per pixel: it has no global pool, got {global_pool!r}")
