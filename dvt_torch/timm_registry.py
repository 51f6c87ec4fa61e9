"""Every registered DVT and VT name as a timm model: `timm.create_model("dvt_t2t_vit_12")` and
`timm.create_model("vt_resnet18")` work.

No weights are ever fetched: `pretrained=True` is refused with a pointer to local loading.
Every model carries timm's `pretrained_cfg` (built from its config by
`dvt_shared.data_config`), so `timm.data.resolve_data_config(model=m)` gives its transform.
The entry points take what timm's `build_model_with_cfg` takes: `device` and `dtype` (the
model is built on the device, then cast), `global_pool`, and `features_only`, which wraps the
model in timm's FeatureListNet (a VT model's ResNet trunk), or in its FeatureGetterNet over
`forward_intermediates` (a DVT cascade's last-stage blocks, or any model with
`feature_cls="getter"`), carrying the feature pretrained_cfg timm gives its own backbones.
"""
from __future__ import annotations

import contextlib

import torch
from timm.models import FeatureDictNet, FeatureHookNet, FeatureListNet, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet  # (not re-exported by timm.models)

from .dvt import DVT
from .models import create_model, list_models

# keyword arguments timm's factory adds that our models have no use for
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "cache_dir")
# timm's names of its feature wrappers (build_model_with_cfg's `feature_cls`)
FEATURE_CLASSES = {"list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet, "getter": FeatureGetterNet}


def _feature_class(name: str, model, feature_cls):
    if feature_cls is None:
        # A cascade's blocks are no module sequence FeatureListNet could run: its features come from
        # forward_intermediates. A trunk's are its modules act1, layer1, ..., as in timm's ResNet.
        return FeatureGetterNet if isinstance(model, DVT) else FeatureListNet
    if isinstance(feature_cls, str):
        if feature_cls.lower() not in FEATURE_CLASSES:
            raise ValueError(
                f"{name}: feature_cls must be one of {sorted(FEATURE_CLASSES)} (or a class), got {feature_cls!r}"
            )
        return FEATURE_CLASSES[feature_cls.lower()]
    return feature_cls


def _features_only(name: str, model, out_indices=None, feature_cls=None):
    """The model as timm's feature backbone, with timm's feature pretrained_cfg (no classifier, class count)."""
    wrapper = _feature_class(name, model, feature_cls)
    out_indices = tuple(range(len(model.feature_info))) if out_indices is None else out_indices
    features = wrapper(model, out_indices=out_indices)
    features.in_chans = model.in_chans
    features.pretrained_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    features.default_cfg = features.pretrained_cfg  # timm's older name, as build_model_with_cfg sets it
    return features


def _entrypoint(name: str):
    def build(pretrained: bool = False, num_classes: int | None = None, features_only: bool = False,
              out_indices=None, feature_cls=None, pretrained_cfg_overlay: dict | None = None,
              global_pool: str | None = None, device=None, dtype: torch.dtype | None = None, **kwargs):
        if pretrained:
            raise ValueError(
                f"{name}: weights are never downloaded; build the model, then load a local file "
                "with dvt_torch.load_weights(model, path)"
            )
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        # Built on `device` (timm's models take device= and dtype=), then every tensor moved and cast:
        # buffers made from NumPy arrays do not follow the default device.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = create_model(name, num_classes=num_classes, **kwargs)
            if global_pool is not None:
                model.reset_classifier(model.num_classes, global_pool)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        model.in_chans = model.config.in_chans
        model.pretrained_cfg = {**model.pretrained_cfg, **(pretrained_cfg_overlay or {})}
        return _features_only(name, model, out_indices, feature_cls) if features_only else model

    build.__name__ = name
    build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"timm entry point of the registered config {name!r} (see dvt_shared.models.get_model_config)."
    return build


for _name in list_models():
    globals()[_name] = register_model(_entrypoint(_name))
