"""The canonical DVT weight format, read and written identically by both backends.

A canonical file is a safetensors file: its tensors are named by the release's state-dict
keys, and its string metadata holds `format: dvt-canonical-v1` plus one JSON value per
`dvt.*` key (the model config, cumulative GMACs per exit, exit thresholds, provenance and
free-form extras). The config's `family` names the model kind: a DVT cascade ("t2t_vit",
"deit") or a VT model ("vt_resnet", "resnet", "vt_fpn", one exit each). safetensors holds
no code, so loading a file can never run any.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import safetensors
import safetensors.numpy

from .data_config import DataConfig
from .exit_policy import EXIT_POLICIES, MAX_SOFTMAX
from .io_utils import atomic_write_bytes
from .models import FAMILIES, MODEL_CONFIG_TYPES, ModelConfig, config_from_dict

FORMAT_KEY = "format"
FORMAT_VERSION = "dvt-canonical-v1"
CONFIG_KEY = "dvt.config"
EXIT_FLOPS_KEY = "dvt.exit_flops"
THRESHOLDS_KEY = "dvt.thresholds"
# The exit policy the thresholds were found for; files written before it existed hold max-softmax thresholds.
EXIT_POLICY_KEY = "dvt.exit_policy"
PROVENANCE_KEY = "dvt.provenance"
# The data config (dvt_shared.data_config: class names, input size, normalisation); optional, files written
# before it existed record none.
DATA_CONFIG_KEY = "dvt.data_config"
EXTRA_KEY = "dvt.extra"

CONVERT_HINT = (
    "convert it with dvt_torch.checkpoint.read_release_checkpoint followed by dvt_shared.save_canonical"
)

# safetensors itself refuses larger headers; a bigger length field means the file is something else.
_MAX_HEADER_BYTES = 100_000_000
# numpy kinds safetensors stores losslessly: bool, signed/unsigned integers, floats.
_STORABLE_KINDS = "biuf"


@dataclass
class WeightMetadata:
    """Everything a canonical file records besides the tensors.

    exit_flops: cumulative GMACs of exiting at each exit (empty when unknown).
    thresholds: confidence thresholds of the exits, or None when not calibrated.
    exit_policy: the name of the exit policy (dvt_shared.exit_policy) the thresholds are for.
    data_config: the images the model takes and the names of its classes, or None where not recorded.
    extra: any further strings, e.g. metrics serialised as JSON.
    """

    config: ModelConfig
    exit_flops: list[float] = field(default_factory=list)
    thresholds: list[float] | None = None
    exit_policy: str = MAX_SOFTMAX.name
    provenance: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    data_config: DataConfig | None = None

    def __post_init__(self):
        if not isinstance(self.config, MODEL_CONFIG_TYPES):
            raise TypeError(f"config must be a DVTConfig or a VT config, got {type(self.config).__name__}")
        self.exit_flops = [float(x) for x in self.exit_flops]
        if self.exit_flops and len(self.exit_flops) != self.config.num_exits:
            raise ValueError(
                f"exit_flops has {len(self.exit_flops)} entries but config {self.config.name} "
                f"has {self.config.num_exits} exits"
            )
        if self.thresholds is not None:
            self.thresholds = [float(x) for x in self.thresholds]
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"unknown exit policy {self.exit_policy!r}; known: {', '.join(EXIT_POLICIES)}")
        if not isinstance(self.provenance, str):
            raise TypeError(f"provenance must be a str, got {type(self.provenance).__name__}")
        bad = [k for k, v in dict(self.extra).items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"extra must map str to str; offending keys: {bad}")
        self.extra = dict(self.extra)
        if self.data_config is not None:
            if not isinstance(self.data_config, DataConfig):
                raise TypeError(f"data_config must be a DataConfig, got {type(self.data_config).__name__}")
            self.data_config.check_model(self.config)

    @property
    def config_name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def to_strings(self) -> dict[str, str]:
        """The safetensors metadata: every value a JSON string."""
        return {
            FORMAT_KEY: FORMAT_VERSION,
            CONFIG_KEY: json.dumps(self.config.to_dict()),
            EXIT_FLOPS_KEY: json.dumps(self.exit_flops),
            THRESHOLDS_KEY: json.dumps(self.thresholds),
            EXIT_POLICY_KEY: json.dumps(self.exit_policy),
            PROVENANCE_KEY: json.dumps(self.provenance),
            EXTRA_KEY: json.dumps(self.extra, sort_keys=True),
            **({DATA_CONFIG_KEY: json.dumps(self.data_config.to_dict())} if self.data_config is not None else {}),
        }

    @classmethod
    def from_strings(cls, strings: Mapping[str, str], source: str = "metadata") -> "WeightMetadata":
        """Inverse of to_strings; `source` names the file in error messages."""
        fmt = strings.get(FORMAT_KEY)
        if fmt != FORMAT_VERSION:
            if isinstance(fmt, str) and fmt.startswith("dvt-canonical-"):
                raise ValueError(f"{source} is in format {fmt!r}; this version reads only {FORMAT_VERSION!r}")
            raise ValueError(
                f"{source} is not a DVT canonical weight file; {CONVERT_HINT} "
                f"(its metadata lacks {FORMAT_KEY}={FORMAT_VERSION!r})"
            )
        required = (CONFIG_KEY, EXIT_FLOPS_KEY, THRESHOLDS_KEY, PROVENANCE_KEY, EXTRA_KEY)
        missing = [k for k in required if k not in strings]
        if missing:
            raise ValueError(f"{source} lacks the metadata key(s) {missing} of {FORMAT_VERSION}")
        values = {}
        for key in (CONFIG_KEY, EXIT_FLOPS_KEY, THRESHOLDS_KEY, PROVENANCE_KEY, EXTRA_KEY):
            try:
                values[key] = json.loads(strings[key])
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: metadata {key} is not valid JSON ({exc})") from exc
        stored = values[CONFIG_KEY]
        family = FAMILIES.get(stored.get("family")) if isinstance(stored, dict) else None
        kind = family.config_class.__name__ if family else "model config"
        try:
            config = config_from_dict(stored)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: metadata {CONFIG_KEY} is not a valid {kind} ({exc})") from exc
        data = None
        if DATA_CONFIG_KEY in strings:
            try:
                data = DataConfig.from_dict(json.loads(strings[DATA_CONFIG_KEY]))
            except ValueError as exc:  # JSONDecodeError included
                raise ValueError(f"{source}: metadata {DATA_CONFIG_KEY} is not a valid data config ({exc})") from exc
        try:
            return cls(
                config=config,
                data_config=data,
                exit_flops=values[EXIT_FLOPS_KEY],
                thresholds=values[THRESHOLDS_KEY],
                exit_policy=json.loads(strings.get(EXIT_POLICY_KEY, json.dumps(MAX_SOFTMAX.name))),
                provenance=values[PROVENANCE_KEY],
                extra=values[EXTRA_KEY],
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid metadata ({exc})") from exc


def _checked_tensors(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor names must be non-empty strings other than '__metadata__', got {name!r}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype.kind not in _STORABLE_KINDS:
            raise TypeError(f"tensor {name!r} has dtype {value.dtype}, which the canonical format cannot store")
        # np.array, unlike np.ascontiguousarray, keeps 0-d arrays 0-d.
        out[name] = np.array(value, order="C", copy=True)
    return out


def save_canonical(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: WeightMetadata) -> None:
    """Write `tensors` and `metadata` to `path` as a canonical file, atomically."""
    if not isinstance(metadata, WeightMetadata):
        raise TypeError(f"metadata must be a WeightMetadata, got {type(metadata).__name__}")
    data = safetensors.numpy.save(_checked_tensors(tensors), metadata=metadata.to_strings())
    atomic_write_bytes(path, data)


def _read_header(path: str) -> dict:
    """The parsed safetensors header of `path`, after checking the file is whole."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a weight file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated or empty ({size} bytes), not a safetensors weight file")
        header_len = int.from_bytes(prefix, "little")
        # A zip signature as length would mean a 67 MB header: no real header is that big.
        if header_len > _MAX_HEADER_BYTES or prefix.startswith(b"PK\x03\x04"):
            # A torch.save zip archive, or the pickle stream of the legacy torch.save format.
            if prefix.startswith((b"PK\x03\x04", b"\x80")):
                raise ValueError(
                    f"{path} is not a safetensors weight file; it looks like a PyTorch checkpoint; {CONVERT_HINT}"
                )
            raise ValueError(f"{path} is not a safetensors weight file")
        raw = handle.read(header_len)
    if len(raw) < header_len:
        raise ValueError(f"{path} is truncated: its header needs {header_len} bytes, only {len(raw)} are present")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_len = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0
        )
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(
            f"{path} has a corrupt safetensors header ({exc}); the file is damaged or not a weight file"
        ) from exc
    if 8 + header_len + data_len > size:
        raise ValueError(
            f"{path} is truncated: its header describes {8 + header_len + data_len} bytes, the file has {size}"
        )
    return header


def read_canonical_metadata(path: str | os.PathLike) -> WeightMetadata:
    """The metadata of a canonical file, without reading its tensors."""
    path = os.fspath(path)
    strings = _read_header(path).get("__metadata__") or {}
    return WeightMetadata.from_strings(strings, source=path)


def load_canonical(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], WeightMetadata]:
    """Tensors (by state-dict key, sorted by key) and metadata of a canonical file."""
    path = os.fspath(path)
    metadata = read_canonical_metadata(path)
    try:
        with safetensors.safe_open(path, framework="numpy") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{path} is a damaged safetensors file: {exc}") from exc
    return tensors, metadata


def _shape_of(value: Any) -> tuple[int, ...]:
    """Shape of an array/tensor/parameter, or of a shape given directly."""
    shape = value.shape if hasattr(value, "shape") else value
    return tuple(int(d) for d in shape)


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any], source: str = "the weights"
) -> None:
    """Raise ValueError listing every missing key, unexpected key and shape mismatch at once.

    `expected` maps the model's keys to shapes; `tensors` maps keys to anything with a
    `.shape` (numpy, torch or MindSpore tensors) or to shapes.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"{source} must map tensor names to arrays (a dict, as load_canonical returns), "
            f"got {type(tensors).__name__}"
        )
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    mismatched = [
        (key, tuple(shape), _shape_of(tensors[key]))
        for key, shape in expected.items()
        if key in tensors and tuple(shape) != _shape_of(tensors[key])
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [
        f"{source} do not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} mis-shaped"
    ]
    if missing:
        lines.append(f"missing keys (in the model, not in {source}):")
        lines += [f"  {key}" for key in missing]
    if unexpected:
        lines.append(f"unexpected keys (in {source}, not in the model):")
        lines += [f"  {key}" for key in unexpected]
    if mismatched:
        lines.append("shape mismatches (key: expected by the model vs found):")
        lines += [f"  {key}: expected {want} vs got {got}" for key, want, got in mismatched]
    raise ValueError("\n".join(lines))


# Weight files by extension, longest first so ".pth.tar" wins over ".tar": the canonical format
# every backend reads, and each backend's own (read and written by that backend alone).
WEIGHT_FORMATS = ((".pth.tar", "pth"), (".pth", "pth"), (".safetensors", "safetensors"), (".ckpt", "ckpt"))
FORMAT_NAMES = {"pth": "release PyTorch checkpoint", "safetensors": "canonical safetensors file",
                "ckpt": "MindSpore checkpoint"}
FORMAT_HELP = ".pth / .pth.tar (release checkpoint), .safetensors (canonical), .ckpt (MindSpore)"


def weight_format(path: str | os.PathLike) -> str:
    """'pth', 'safetensors' or 'ckpt', from the file name of `path`."""
    name = os.path.basename(os.fspath(path)).lower()
    for extension, kind in WEIGHT_FORMATS:
        if name.endswith(extension):
            return kind
    raise ValueError(f"cannot tell the weight format of {os.fspath(path)!r} from its extension; expected {FORMAT_HELP}")


def _foreign(path, kind: str, own_format: str) -> ValueError:
    return ValueError(
        f"{os.fspath(path)} is a {FORMAT_NAMES[kind]}; this backend reads canonical .safetensors and "
        f"{FORMAT_NAMES[own_format]}s: convert it with `dvt convert`"
    )


def recorded_data_config(path) -> DataConfig | None:
    """The data config a weight file records: a canonical file's, where it has one (other formats hold none)."""
    return read_canonical_metadata(path).data_config if weight_format(path) == "safetensors" else None


def read_weight_tensors(path, own_format: str, read_own) -> dict[str, np.ndarray]:
    """Tensors by release key of a canonical file, or of a file in the backend's own format (`read_own(path)`)."""
    kind = weight_format(path)
    if kind == "safetensors":
        return load_canonical(path)[0]
    if kind != own_format:
        raise _foreign(path, kind, own_format)
    return read_own(path)


def write_weight_tensors(
    path, tensors: Mapping[str, np.ndarray], config: ModelConfig, own_format: str, write_own,
) -> None:
    """Write `tensors` as a canonical file (config and per-exit GFLOPs in its metadata) or in the backend's own
    format."""
    from .models import model_gflops

    kind = weight_format(path)
    if kind == "safetensors":
        save_canonical(path, tensors, WeightMetadata(config=config, exit_flops=list(model_gflops(config))))
    elif kind == own_format:
        write_own(path, tensors)
    else:
        raise _foreign(path, kind, own_format)
