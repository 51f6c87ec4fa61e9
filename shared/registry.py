"""The one registry of model names: every DVT and VT config the project defines, by name.

A module that defines a model writes a function returning its config and decorates it with
`register_model_config`; the function's name is the model's name. `dvt_shared.models` reads this
registry (`list_model_names`, `get_model_config`), and so do the backends' `create_model` and the
timm entry points; nothing else keeps a list of names.
"""
from __future__ import annotations

from typing import Any, Callable

CONFIGS: dict[str, Callable[[], Any]] = {}


def register_model_config(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Register `fn()` as the config of the model named `fn.__name__`."""
    if fn.__name__ in CONFIGS:
        raise ValueError(f"model name {fn.__name__!r} is registered twice")
    CONFIGS[fn.__name__] = fn
    return fn
