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
    for name, held in zip(ReuseState._fields, state):
        if held is not None and held.shape[0] != images.shape[0]:
            raise ValueError(
                f"the ReuseState's {name} are of {held.shape[0]} images, the batch has {images.shape[0]}: "
                "pass the state the previous stage returned for these same images"
            )
    logits, features, relations = stage(images, state.features, state.relations)
    return logits, ReuseState(features, relations)
