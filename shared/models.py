"""Every model family and every registered model, DVT and VT alike.

A config's `family` says which kind it is ("t2t_vit" and "deit" are DVT cascades;
"vt_resnet", "resnet" and "vt_fpn" are VT models), so a stored config dict needs no other
tag. `FAMILIES` maps each family to what the framework-free code needs of it: its config
class (which serialises itself with `to_dict`/`from_dict`), its per-exit GFLOPs and its
canonical weight layout. Model names live in one registry (`dvt_shared.registry`), read here
by `list_model_names` and `get_model_config`. Each backend keeps one table, family -> model
class, and builds through `build(table, config)`, so no caller ever asks which kind of config
it holds.

A new family adds its config class, FLOP formula and layout, one `register_family` here,
and one entry in each backend's `BUILDERS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import registry
from .configs import DVTConfig
from .flops import exit_gflops
from .layout import (
    LayerNames,
    Layout,
    dvt_layer_names,
    dvt_layout,
    vt_fpn_layer_names,
    vt_fpn_layout,
    vt_resnet_layer_names,
    vt_resnet_layout,
)
from .vt import VTFPNConfig, VTResNetConfig, vt_gflops

ModelConfig = DVTConfig | VTResNetConfig | VTFPNConfig


@dataclass(frozen=True)
class ModelFamily:
    """What every framework-free part of the project knows of one kind of model."""

    name: str
    config_class: type
    gflops: Callable[[Any], tuple[float, ...]]  # cumulative GFLOPs (10^9 multiply-adds) of every exit
    layout: Callable[[Any], Layout]  # canonical key -> shape
    layer_names: Callable[[Any], LayerNames]  # (classifier, first convolution) for timm's pretrained_cfg
    cascade: bool  # several exits with thresholds between them
    task: str = "classification"  # or "segmentation": per-pixel logits


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


for _name in ("t2t_vit", "deit"):
    register_family(ModelFamily(_name, DVTConfig, exit_gflops, dvt_layout, dvt_layer_names, cascade=True))
for _name in ("vt_resnet", "resnet"):
    register_family(ModelFamily(
        _name, VTResNetConfig, vt_gflops, vt_resnet_layout, vt_resnet_layer_names, cascade=False,
    ))
register_family(
    ModelFamily("vt_fpn", VTFPNConfig, vt_gflops, vt_fpn_layout, vt_fpn_layer_names, cascade=False, task="segmentation")
)

MODEL_CONFIG_TYPES = tuple(dict.fromkeys(family.config_class for family in FAMILIES.values()))


def family_of(config: ModelConfig) -> ModelFamily:
    """The family `config` belongs to; TypeError for anything that is not a registered family's config."""
    family = FAMILIES.get(getattr(config, "family", None))
    if family is None or not isinstance(config, family.config_class):
        raise TypeError(f"not a model config of a registered family ({', '.join(FAMILIES)}): {type(config).__name__}")
    return family


def build(builders: Mapping[str, Callable[[Any], Any]], config: ModelConfig):
    """The model `config` describes, from `builders` (a backend's family -> model class table)."""
    family = family_of(config).name
    if family not in builders:
        raise ValueError(f"this backend builds no {family} models; it builds {', '.join(builders)}")
    return builders[family](config)


def check_num_classes(num_classes) -> None:
    """ValueError unless `num_classes` is a class count a head can be reset to (0: no head)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")


def create(build_model: Callable[[ModelConfig], Any], name: str, num_classes: int | None = None,
           checkpoint_path=None, load_weights=None, **overrides):
    """The registered model `name`, built by a backend's `build_model` (timm's and mindcv's `create_model`):
    its config's class count stands unless `num_classes` (or any other field) is overridden, and
    `num_classes=0` removes the heads. With `checkpoint_path`, the backend's `load_weights(model, path)`
    loads its weights first (and, from a canonical file, the data config it records: see `load_weights`)."""
    model = build_model(get_model_config(name, num_classes=num_classes or None, **overrides))
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    if num_classes == 0:
        model.reset_classifier(0)
    return model


def list_model_names(pattern: str | None = None, cascade: bool | None = None) -> list[str]:
    """Every registered model name, or those matching the shell-style `pattern` (e.g. "dvt_*"); with
    `cascade`, only DVT cascades (True) or only single-exit VT models and baselines' trunks (False)."""
    from fnmatch import fnmatch

    return [
        name for name in sorted(registry.CONFIGS)
        if (pattern is None or fnmatch(name, pattern))
        and (cascade is None or family_of(registry.CONFIGS[name]()).cascade == cascade)
    ]


def get_model_config(name: str, num_classes: int | None = None, **overrides) -> ModelConfig:
    """The registered config `name`, of any family, with `num_classes` and any other field overridden
    (nested specs and stages take `to_dict`'s form)."""
    if name not in registry.CONFIGS:
        raise ValueError(f"unknown model name {name!r}; registered names: {', '.join(list_model_names())}")
    config = registry.CONFIGS[name]()
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return config.replace(**overrides) if overrides else config


def config_from_dict(data: dict) -> ModelConfig:
    """The config a `to_dict()` produced, of whichever kind its family names."""
    if not isinstance(data, dict):
        raise TypeError(f"a config is stored as a JSON object, got {type(data).__name__}")
    family = FAMILIES.get(data.get("family"))
    if family is None:
        raise ValueError(f"unknown model family {data.get('family')!r}; registered families: {', '.join(FAMILIES)}")
    return family.config_class.from_dict(data)


def model_gflops(config: ModelConfig) -> tuple[float, ...]:
    """Cumulative GFLOPs (10^9 multiply-adds) of every exit; VT models have one."""
    return family_of(config).gflops(config)


def state_layout(config: ModelConfig) -> Layout:
    """Canonical key -> shape of the model `config` describes, the same in every backend."""
    return family_of(config).layout(config)
