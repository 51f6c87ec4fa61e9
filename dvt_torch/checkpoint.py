"""Reading and writing checkpoints in the published release's own `.pth` layout.

Release checkpoints are pickles. They are read with `torch.load(weights_only=True)` only,
which rebuilds tensors and plain containers and refuses everything else, so a crafted
file cannot run code here. Convert them once to the canonical safetensors format
(`dvt_shared.save_canonical`) and load that from then on.
"""
from __future__ import annotations

import os
import pickle
import pickletools
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from dvt_shared.data_config import apply_data_config
from dvt_shared.io_utils import atomic_writer
from dvt_shared.weight_format import read_weight_tensors, recorded_data_config, write_weight_tensors

from .convert import from_canonical, to_canonical

# Where a checkpoint dict keeps its weights, most specific first (release, common, timm-style).
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
DDP_PREFIX = "module."

_ZIP_MAGIC = b"PK\x03\x04"
# The legacy (pre zip) torch.save format opens with a pickled constant: this int.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# A legacy file is five pickles (magic, protocol, sys info, object, storage keys), then raw storages.
_LEGACY_PICKLES = 5


@dataclass
class ReleaseCheckpoint:
    """What a release checkpoint holds, converted to numpy and plain Python.

    flops: GMACs of exiting at each exit. dynamic_threshold: the (budgets, exits) confidence
    thresholds of budgeted batch classification. extra_keys: top-level keys not read here.
    """

    state_dict: dict[str, np.ndarray]
    flops: list[float] | None = None
    dynamic_threshold: np.ndarray | None = None
    anytime_classification: Any = None
    budgeted_batch_classification: Any = None
    extra_keys: list[str] = field(default_factory=list)


def _refused_message(path: str) -> str:
    return (
        f"refused to load {path}: it contains pickled objects other than tensors and plain containers "
        "(loading it would run code)"
    )


def _sniff(path: str) -> str:
    """Which torch.save format `path` is in, "zip" or "legacy"; ValueError for anything else."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(32)
    if not head:
        raise ValueError(f"{path} is empty, not a PyTorch checkpoint")
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        raise ValueError(
            f"{path} looks like a safetensors file, not a PyTorch checkpoint; read it with dvt_shared.load_canonical"
        )
    raise ValueError(
        f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy torch.save file)"
    )


def _legacy_truncated(path: str) -> bool:
    """Whether the pickles of a legacy file end early; pickletools only parses, it builds nothing."""
    with open(path, "rb") as handle:
        try:
            for _ in range(_LEGACY_PICKLES):
                for _ in pickletools.genops(handle):
                    pass
        except ValueError:
            return True
    return False


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, without torch's advice on bypassing it."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    # torch wraps the reason in lines that name weights_only: advice to turn it off, and a link.
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else type(exc).__name__


def load_weights_only(path: str | os.PathLike) -> Any:
    """What `torch.save` stored in `path`, rebuilt by torch's weights-only unpickler.

    Tensors and plain containers only: a file that would run code when unpickled is refused
    with a ValueError (without torch's advice to load it unsafely), and so is a truncated
    or corrupt one. For release checkpoints and training checkpoints alike.
    """
    path = os.fspath(path)
    kind = _sniff(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        # A cut-off legacy pickle can read as an odd global name; say truncated, not malicious.
        if kind == "legacy" and _legacy_truncated(path):
            raise ValueError(f"{path} is truncated or corrupt ({reason})") from None
        if any(word in reason for word in ("GLOBAL", "global", "allowlist", "Can only")):
            # from None: torch's own message advises weights_only=False, which would run the code.
            raise ValueError(f"{_refused_message(path)}; torch reported: {reason}") from None
        raise ValueError(f"{path} is a corrupt PyTorch checkpoint ({reason})") from None
    except Exception as exc:
        # torch reports damaged files as RuntimeError, EOFError, struct.error, OSError, ...
        first_line = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{path} is truncated or corrupt: {type(exc).__name__}: {first_line}") from exc


def _to_numpy(path: str, name: str, tensor: torch.Tensor) -> np.ndarray:
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise ValueError(f"{path}: tensor {name!r} is {tensor.layout}/quantized; only dense tensors are supported")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def _plain(value: Any) -> Any:
    """Tensors and tuples turned into lists, so results can be printed or stored as JSON."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _state_dict(path: str, raw: Mapping) -> dict[str, np.ndarray]:
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: the state dict has entries that are not tensors: {not_tensors}")
    out: dict[str, np.ndarray] = {}
    for key, tensor in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state-dict key {key!r} is not a string")
        # Models trained under DistributedDataParallel prefix every key with "module.".
        name = key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key
        if name in out:
            raise ValueError(f"{path}: keys {key!r} and {name!r} collide once the {DDP_PREFIX!r} prefix is removed")
        out[name] = _to_numpy(path, key, tensor)
    return out


def read_release_checkpoint(path: str | os.PathLike) -> ReleaseCheckpoint:
    """Weights and evaluation records of a release-style checkpoint, without running any pickled code.

    Accepts the release's dict (`model_state_dict`, `flops`, `dynamic_threshold`, ...), a dict
    with `state_dict` or `model`, or a flat dict of tensors.
    """
    path = os.fspath(path)
    obj = load_weights_only(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors or a checkpoint dict")
    weights_key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
    if weights_key is None:
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError(
                f"{path} holds no tensors: no {' / '.join(STATE_DICT_KEYS)} entry and no tensor values "
                f"(top-level keys: {sorted(map(str, obj))})"
            )
        consumed = set(tensors)
    else:
        tensors = obj[weights_key]
        consumed = {weights_key}
    state_dict = _state_dict(path, tensors)
    if not state_dict:
        raise ValueError(f"{path}: its {weights_key!r} entry holds no tensors")

    flops = obj.get("flops")
    if flops is not None:
        try:
            flops = [float(x) for x in flops]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: 'flops' is not a list of numbers ({exc})") from exc
    threshold = obj.get("dynamic_threshold")
    if isinstance(threshold, torch.Tensor):
        threshold = _to_numpy(path, "dynamic_threshold", threshold)
    elif threshold is not None:
        threshold = np.asarray(_plain(threshold), dtype=np.float64)
    known = consumed | {"flops", "dynamic_threshold", "anytime_classification", "budgeted_batch_classification"}
    return ReleaseCheckpoint(
        state_dict=state_dict,
        flops=flops,
        dynamic_threshold=threshold,
        anytime_classification=_plain(obj.get("anytime_classification")),
        budgeted_batch_classification=_plain(obj.get("budgeted_batch_classification")),
        extra_keys=sorted(str(k) for k in obj if k not in known),
    )


def _to_torch(name: str, array: np.ndarray) -> torch.Tensor:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"state-dict entry {name!r} must be a numpy array, got {type(array).__name__}")
    # torch.from_numpy needs native byte order; np.array copies, so the tensor owns its memory.
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="), order="C"))


def write_release_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    flops: list[float] | None = None,
    dynamic_threshold: np.ndarray | None = None,
    *,
    anytime_classification: Any = None,
    budgeted_batch_classification: Any = None,
) -> None:
    """Write weights (and evaluation records) as the release lays out its checkpoints, atomically.

    The result loads with the release's own scripts (`checkpoint['model_state_dict']`, ...).
    """
    checkpoint: dict[str, Any] = {"model_state_dict": {k: _to_torch(k, v) for k, v in state_dict.items()}}
    if flops is not None:
        checkpoint["flops"] = [float(x) for x in flops]
    if dynamic_threshold is not None:
        checkpoint["dynamic_threshold"] = _to_torch("dynamic_threshold", np.asarray(dynamic_threshold))
    if anytime_classification is not None:
        checkpoint["anytime_classification"] = anytime_classification
    if budgeted_batch_classification is not None:
        checkpoint["budgeted_batch_classification"] = budgeted_batch_classification
    with atomic_writer(path, "wb") as handle:
        # The legacy format: the release pins torch 1.3, which predates zip-archive checkpoints.
        torch.save(checkpoint, handle, _use_new_zipfile_serialization=False)


# This backend's own weight format (dvt_shared.weight_format.WEIGHT_FORMATS).
CHECKPOINT_FORMAT = "pth"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[float] | None]:
    """(tensors by release key, GMACs per exit if recorded) of a release-style `.pth`."""
    checkpoint = read_release_checkpoint(path)
    return checkpoint.state_dict, checkpoint.flops


def write_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], exit_flops: list[float] | None = None,
) -> None:
    """Canonical tensors as a release-style `.pth`, atomically."""
    write_release_checkpoint(path, tensors, flops=exit_flops)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load canonical `.safetensors` or release `.pth` / `.pth.tar` weights into `model`, every tensor
    checked first (see `from_canonical`), with the data config a canonical file records as the model's
    `pretrained_cfg` (normalisation and class names for timm's `resolve_data_config`); returns the model."""
    tensors = read_weight_tensors(path, CHECKPOINT_FORMAT, lambda p: read_checkpoint(p)[0])
    from_canonical(model, tensors, source=os.fspath(path))
    recorded = recorded_data_config(path)
    if recorded is not None:
        apply_data_config(model, recorded)
    return model


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s weights as canonical `.safetensors` (with its config) or as a release `.pth`, atomically."""
    write_weight_tensors(path, to_canonical(model), model.config, CHECKPOINT_FORMAT, write_checkpoint)
