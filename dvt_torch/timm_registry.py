"""Every registered DVT and VT name as a timm model: `timm.create_model("dvt_t2t_vit_12")` and
`timm.create_model("vt_resnet18")` work.

No weights are ever fetched: `pretrained=True` is refused with a pointer to local loading.
Every model carries timm's `pretrained_cfg` (built from its config by
`dvt_shared.data_config`), so `timm.data.resolve_data_config(model=m)` gives its transform;
`features_only=True` wraps the ResNet trunk of the VT models in timm's FeatureListNet.
"""
from __future__ import annotations

from timm.models import FeatureListNet, register_model

from .models import create_model, list_models

# keyword arguments timm's factory adds that our models have no use for
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "cache_dir")


def _features_only(name: str, model, out_indices=None):
    if not hasattr(model, "feature_info"):
        raise ValueError(f"{name}: features_only needs a convolutional trunk; a DVT cascade has none")
    out_indices = tuple(range(len(model.feature_info))) if out_indices is None else out_indices
    features = FeatureListNet(model, out_indices=out_indices)
    features.pretrained_cfg = model.pretrained_cfg
    return features


def _entrypoint(name: str):
    def build(pretrained: bool = False, num_classes: int | None = None, features_only: bool = False,
              out_indices=None, pretrained_cfg_overlay: dict | None = None, **kwargs):
        if pretrained:
            raise ValueError(
                f"{name}: weights are never downloaded; build the model, then load a local file "
                "with dvt_torch.load_weights(model, path)"
            )
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        model = create_model(name, num_classes=num_classes, **kwargs)
        model.pretrained_cfg = {**model.pretrained_cfg, **(pretrained_cfg_overlay or {})}
        return _features_only(name, model, out_indices) if features_only else model

    build.__name__ = name
    build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"timm entry point of the registered config {name!r} (see dvt_shared.models.get_model_config)."
    return build


for _name in list_models():
    globals()[_name] = register_model(_entrypoint(_name))
