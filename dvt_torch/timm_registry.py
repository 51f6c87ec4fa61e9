"""Every registered DVT and VT name as a timm model: `timm.create_model("dvt_t2t_vit_12")` and
`timm.create_model("vt_resnet18")` work.

No weights are ever fetched: `pretrained=True` is refused with a pointer to local loading.
"""
from __future__ import annotations

from timm.models import register_model

from dvt_shared.models import list_model_names

from .models import create_model

# keyword arguments timm's factory adds that a DVT has no use for
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str):
    def build(pretrained: bool = False, num_classes: int | None = None, **kwargs):
        if pretrained:
            raise ValueError(
                f"{name}: weights are never downloaded; build the model, then load a local file "
                "with dvt_torch.load_weights(model, path)"
            )
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        return create_model(name, num_classes=num_classes, **kwargs)

    build.__name__ = name
    build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"timm entry point of the registered config {name!r} (see dvt_shared.models.get_model_config)."
    return build


for _name in list_model_names():
    globals()[_name] = register_model(_entrypoint(_name))
