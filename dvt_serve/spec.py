"""What a replica of `dvt serve` needs, and every serving default, in one place: the command's options default
to these fields (`serve_default`), the stage batcher's arguments too, and Ray ships the spec to each replica."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ServeSpec:
    """The model a replica serves (config, tensors, thresholds, exit policy, data config) and how."""

    config: Any  # a DVTConfig
    tensors: dict[str, np.ndarray]
    thresholds: list[float]
    exit_policy: str
    data: Any = None  # the weights' DataConfig (class names, normalisation); None: the default rule's
    backend: str = "torch"
    precision: str = "fp32"
    max_batch: int = 32  # images per stage batch
    max_wait_ms: float = 5.0  # how long a stage's oldest image waits for a fuller batch
    max_queue: int = 1024  # images a replica holds at most; beyond it requests get 503
    batching: str = "stage"  # "stage" (a queue per stage) or "cascade" (each batch runs the whole cascade)
    max_body: int = 8 * 1024 * 1024  # largest request body in bytes
    threads: int = 1  # compute threads per replica
    request_counter: Any = None  # a Ray actor counting answered requests (`dvt serve --stop-after`)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServeSpec) if f.default is not dataclasses.MISSING}


def serve_default(name: str):
    """The default of the ServeSpec field `name`."""
    return _DEFAULTS[name]
