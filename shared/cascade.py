"""The stage contract of a DVT cascade, the same in every backend.

A stage is called as `stage(images, features, relations)` and returns `(logits, features,
relations)`: the last two are what the next stage reuses, None where it reuses nothing (and
after the last stage). Between stages they travel together as a `ReuseState`, in every engine
(PyTorch, MindSpore, ONNX Runtime); an exported stage graph takes and gives them positionally
(`positional`, `from_positional`), by name with the "prev_" prefix as its inputs (`feeds`).
"""
from __future__ import annotations

from typing import Any, NamedTuple


class ReuseState(NamedTuple):
    """What stage k hands to stage k+1, as tensors of the backend that ran it.

    features: (B, N, D) last-block tokens before the final norm, or None.
    relations: (B, heads*depth, N, N) attention logits of every block (reused ones added), or None.
    """

    features: Any
    relations: Any

    def map(self, fn) -> "ReuseState":
        """`fn` applied to every tensor held, None kept: rows taken, devices or array types changed."""
        return ReuseState(*(None if t is None else fn(t) for t in self))

    def positional(self) -> tuple:
        """The tensors held, in field order: how a stage graph takes and gives them."""
        return tuple(t for t in self if t is not None)

    @classmethod
    def from_positional(cls, tensors, names) -> "ReuseState":
        """The state of a graph's positional reuse tensors, whose field names are `names` (in field order)."""
        tensors = tuple(tensors)
        if len(tensors) != len(names) or not set(names) <= set(cls._fields):
            raise ValueError(f"{len(tensors)} reuse tensor(s) for the names {list(names)}")
        held = dict(zip(names, tensors))
        return cls(*(held.get(name) for name in cls._fields))

    def feeds(self, prefix: str = "prev_") -> dict:
        """The tensors held by input name of an exported stage graph ("prev_features", "prev_relations")."""
        return {prefix + name: t for name, t in zip(self._fields, self) if t is not None}


def run_stage(stage, images, state: ReuseState | None) -> tuple[Any, ReuseState]:
    """Logits of `stage` on `images` given the previous stage's state, and the state for the next one.

    `stage` has `feature_reuse` and `relation_reuse` flags; one that reuses needs a state.
    """
    if (stage.feature_reuse or stage.relation_reuse) and state is None:
        raise ValueError("this stage reuses the previous stage's work: pass the ReuseState it returned")
    state = state or ReuseState(None, None)
    check_state_batch(state, images)
    logits, features, relations = stage(images, state.features, state.relations)
    return logits, ReuseState(features, relations)


def check_state_batch(state: ReuseState, images) -> None:
    """ValueError unless every tensor `state` holds is of as many images as `images`. Sizes that are not
    numbers (torch.fx's proxies while it traces a model) are not compared."""
    for name, held in zip(ReuseState._fields, state):
        sizes = held.shape[0] if held is not None else None, images.shape[0]
        if all(isinstance(size, int) for size in sizes) and sizes[0] != sizes[1]:
            raise ValueError(
                f"the ReuseState's {name} are of {held.shape[0]} images, the batch has {images.shape[0]}: "
                "pass the state the previous stage returned for these same images"
            )


class CascadeModel:
    """The framework-free part of a DVT model, written once: both backends' `DVT` inherit it beside their
    framework's module class (`nn.Module`, `nn.Cell`) and add only what computes.

    It holds the config, the stage names, timm's attributes (`pretrained_cfg`, `num_classes`,
    `num_features`, `global_pool`), stage lookup and the stage contract, the heads, and the checks and
    bookkeeping of `reset_classifier`. A backend's model has one attribute per stage name, each with
    `head` and `forward_head`.
    """

    output_fmt = "NLC"

    def _set_cascade(self, config) -> None:
        """Record `config` and the attributes it sets; call right after the framework class's `__init__`."""
        from .data_config import pretrained_cfg

        self.config = config
        self.stage_names = tuple(stage.name for stage in config.stages)
        self.num_classes = config.num_classes
        self.num_features = self.head_hidden_size = config.embed_dim
        self.global_pool = "token"
        self.pretrained_cfg = pretrained_cfg(config)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    @property
    def num_exits(self) -> int:
        return len(self.stage_names)

    def stage(self, index: int):
        if not 0 <= index < self.num_exits:
            raise IndexError(f"{self.config.name} has exits 0..{self.num_exits - 1}, got {index}")
        return getattr(self, self.stage_names[index])

    def run_stage(self, index: int, x, state: ReuseState | None):
        """`forward_stage` without input checks, for callers that validated the batch once."""
        return run_stage(self.stage(index), x, state)

    def forward_head(self, tokens, pre_logits: bool = False):
        """The last exit's logits of `forward_features`' tokens (its class token, `pre_logits`)."""
        return self.stage(self.num_exits - 1).forward_head(tokens, pre_logits)

    def get_classifier(self) -> tuple:
        """Every exit's head, first exit first (timm's distilled models also return a tuple)."""
        return tuple(self.stage(index).head for index in range(self.num_exits))

    def _check_classifier_reset(self, num_classes, global_pool) -> None:
        """ValueError unless `reset_classifier(num_classes, global_pool)` can be done."""
        from .models import check_num_classes

        if global_pool not in (None, "token"):
            raise ValueError(
                f"{self.config.name} reads its class token: global_pool must be 'token', got {global_pool!r}"
            )
        check_num_classes(num_classes)

    def _record_num_classes(self, num_classes: int) -> None:
        """The class count after new heads (0 keeps the config's: the heads are gone, not resized)."""
        self.num_classes = num_classes
        if num_classes:
            self.config = self.config.replace(num_classes=num_classes)
