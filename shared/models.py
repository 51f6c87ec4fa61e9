"""Every registered model, DVT and VT alike: names, configs by name or by dict, GFLOPs per exit.

A config's `family` says which kind it is ("t2t_vit" and "deit" are DVT cascades;
"vt_resnet", "resnet" and "vt_fpn" are VT models), so a stored config dict needs no other tag.
"""
from __future__ import annotations

from .configs import DVTConfig, get_config, list_configs
from .flops import exit_gflops
from .vt import VT_FAMILIES, VTFPNConfig, VTResNetConfig, get_vt_config, list_vt_configs, vt_config_from_dict, vt_gflops

ModelConfig = DVTConfig | VTResNetConfig | VTFPNConfig
MODEL_CONFIG_TYPES = (DVTConfig, VTResNetConfig, VTFPNConfig)


def list_model_names() -> list[str]:
    return sorted(list_configs() + list_vt_configs())


def get_model_config(name: str, num_classes: int | None = None, **overrides) -> ModelConfig:
    """The registered DVT or VT config `name`, with any field overridden."""
    if name in list_vt_configs():
        return get_vt_config(name, num_classes=num_classes, **overrides)
    if name in list_configs():
        return get_config(name, num_classes=num_classes, **overrides)
    raise ValueError(f"unknown model name {name!r}; registered names: {', '.join(list_model_names())}")


def config_from_dict(data: dict) -> ModelConfig:
    """The config a `to_dict()` produced, of whichever kind its family names."""
    if not isinstance(data, dict):
        raise TypeError(f"a config is stored as a JSON object, got {type(data).__name__}")
    if data.get("family") in VT_FAMILIES:
        return vt_config_from_dict(data)
    if "stages" not in data:
        raise ValueError(
            f"unknown model family {data.get('family')!r}: neither a DVT cascade (a config with stages) "
            f"nor a VT model ({', '.join(VT_FAMILIES)})"
        )
    return DVTConfig.from_dict(data)


def model_gflops(config: ModelConfig) -> tuple[float, ...]:
    """Cumulative GFLOPs (10^9 multiply-adds) of every exit; VT models have one."""
    if isinstance(config, DVTConfig):
        return exit_gflops(config)
    return vt_gflops(config)
