"""The backends, in one table that the commands, the tests' adapters (tests/backends.py) and the
parity tests read. Each is a package whose facade (its `__init__`) has the same names, so a command
picks one by name and never imports a backend's modules; a backend is imported only by the command
that runs on it. README, "Adding a backend", lists what a new one touches."""
from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class Backend:
    package: str
    label: str  # its name in reports
    weights: str | None = None  # its own weight file format (dvt_shared.weight_format.WEIGHT_FORMATS)
    exports: str | None = None  # the graph format its `export` writes
    graphs_from: str | None = None  # it runs the graphs that backend exports, not a model
    precisions: tuple[str, ...] = ("fp32",)  # what its engine and scoring compute in
    # the hardware it runs on ("cpu", "gpu", "ascend"), each by its framework's own device name
    devices: dict[str, str] = field(default_factory=lambda: {"cpu": "cpu"})


BACKENDS = {
    # bf16 and fp16 by autocast (the performer's random features kept in float32); MindSpore's fp16 as
    # Ascend's Cube unit computes
    "torch": Backend("dvt_torch", "PyTorch", weights="pth", exports="onnx", precisions=("fp32", "bf16", "fp16"),
                     devices={"cpu": "cpu", "gpu": "cuda"}),
    "mindspore": Backend("dvt_mindspore", "MindSpore", weights="ckpt", exports="mindir", precisions=("fp32", "fp16"),
                         devices={"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}),
    "onnx": Backend("dvt_onnx", "ONNX Runtime", graphs_from="torch"),
}
# The backend every other one is held to: it trains, and its float64 run is proven against the release's.
REFERENCE = "torch"
EXPORT_FORMATS = tuple(b.exports for b in BACKENDS.values() if b.exports)
PRECISIONS = tuple(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))


def model_backends() -> tuple[str, ...]:
    """The backends that build and run models (not another backend's exported graphs), in table order."""
    return tuple(name for name, b in BACKENDS.items() if b.graphs_from is None)


def parity_pairs() -> list[tuple[str, str]]:
    """(reference, candidate) pairs the parity tests check: every model backend against the reference."""
    return [(REFERENCE, name) for name in model_backends() if name != REFERENCE]


class BackendMissing(RuntimeError):
    """A backend's framework is not installed."""


def load(name: str) -> ModuleType:
    """The facade of backend `name`."""
    try:
        return importlib.import_module(BACKENDS[name].package)
    except ModuleNotFoundError as exc:
        raise BackendMissing(f"the {name} backend needs {exc.name}, which is not installed") from exc


def for_weights(kind: str) -> ModuleType:
    """The facade that reads and writes weight files of format `kind` ('pth', 'ckpt')."""
    return load(next(name for name, b in BACKENDS.items() if b.weights == kind))


def for_export(graph_format: str) -> ModuleType:
    """The facade whose `export` writes `graph_format` ('onnx', 'mindir')."""
    return load(next(name for name, b in BACKENDS.items() if b.exports == graph_format))


def check_precision(precision: str, name: str) -> None:
    """ValueError unless backend `name` computes at `precision`."""
    if precision not in BACKENDS[name].precisions:
        runs_it = [n for n, b in BACKENDS.items() if precision in b.precisions]
        raise ValueError(
            f"--precision {precision} does not exist for --backend {name}: {precision} runs on {' or '.join(runs_it)}"
        )


def engine(
    name: str, config, tensors, thresholds, graphs_dir: str | None = None, precision: str = "fp32", exit_policy=None,
    max_batch: int | None = None,
):
    """Backend `name`'s early-exit engine at `precision` over the model `config` and `tensors` describe,
    deciding by `exit_policy` (a dvt_shared.exit_policy.ExitPolicy; None: the release's max-softmax), running
    at most `max_batch` images at once (None: the engines' default; MindSpore's gears go up to it).

    A backend that runs exported graphs takes them from `graphs_dir`, or from a temporary folder that the
    exporting backend fills and the engine is built from; the folder is removed once the engine holds them.
    """
    from dvt_shared.exit_policy import MAX_SOFTMAX

    check_precision(precision, name)
    facade = load(name)
    policy = exit_policy or MAX_SOFTMAX
    options = {"exit_policy": policy, **({"max_batch": max_batch} if max_batch is not None else {})}
    source = BACKENDS[name].graphs_from
    if source is None:
        return facade.AdaptiveDVT(facade.inference_model(config, tensors), thresholds, precision=precision, **options)
    if graphs_dir is not None:
        return facade.AdaptiveDVT(graphs_dir, thresholds, **options)
    exporter = load(source)
    with tempfile.TemporaryDirectory(prefix=f"dvt_{name}_") as exported:
        exporter.export(exporter.inference_model(config, tensors), exported)
        return facade.AdaptiveDVT(exported, thresholds, **options)
