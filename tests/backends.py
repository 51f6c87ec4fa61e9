"""The backends every backend-parametrised test runs on, each behind one small adapter (Keras 3 style).

A test written against the `backend` fixture (tests/conftest.py) runs once per backend of the
one table, `dvt_cli.backends.BACKENDS`, that runs models (not exported graphs); the parity tests
take their (reference, candidate) pairs from the same table and these adapters. A new backend is
one more adapter here, under its name in that table. Each adapter imports its framework when
it is built, so collecting the tests imports neither.

The parity methods (`device_missing`, `activate`, `apply`, `trace`, `sgd_step`, `canonical`) take the
framework's own device name, as the table's `Backend.devices` gives it for a hardware kind.
"""
from __future__ import annotations

import contextlib

import numpy as np

from dvt_cli.backends import model_backends

# Sets of MindSpore stage graphs (with their compiled shapes) kept per process, the oldest dropped first
GRAPHS_KEPT = 4


def _to_numpy(value, convert):
    """Tensors (possibly nested in tuples and lists) as NumPy arrays, the nesting kept."""
    if isinstance(value, (tuple, list)):
        return [_to_numpy(v, convert) for v in value]
    return None if value is None else convert(value)


def _traced(adapter, named_modules, run, pattern) -> list[tuple[str, list]]:
    """(name, outputs as NumPy arrays) of every module (cell) of `named_modules` matching `pattern`, in the
    order they ran during `run()`; PyTorch modules and MindSpore cells both take forward hooks."""
    records = []
    handles = [module.register_forward_hook(lambda _m, _i, out, name=name: records.append((name, out)))
               for name, module in named_modules if pattern.match(name)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [(name, _to_numpy(out if isinstance(out, (tuple, list)) else [out], adapter.numpy)) for name, out in records]


class TorchBackend:
    name = "torch"
    # Execution modes a model can run in; "eager" is the only one PyTorch has here.
    modes = ("eager",)

    def __init__(self):
        import torch

        import dvt_torch
        from dvt_torch import convert, engine, layers, vt

        self.torch, self.package, self.convert, self.layers, self.vt = torch, dvt_torch, convert, layers, vt
        self.engine_module = engine

    def tensor(self, array: np.ndarray):
        """`array` as this backend's tensor, dtype kept."""
        return self.torch.from_numpy(np.ascontiguousarray(array))

    def numpy(self, tensor) -> np.ndarray:
        return tensor.detach().cpu().numpy()

    def build(self, config):
        """The model `config` describes (DVT or VT), in eval mode."""
        return self.package.build_model(config).eval()

    def create_model(self, name: str, **overrides):
        return self.package.create_model(name, **overrides).eval()

    def twin(self, torch_model):
        """A model of this backend holding `torch_model`'s weights (here: the model itself)."""
        return torch_model

    def float64(self, model):
        """`model` computing in float64 (its input must be float64 too)."""
        return model.double()

    def mode(self, mode: str):
        if mode not in self.modes:
            raise ValueError(f"PyTorch runs in {self.modes}, not {mode!r}")
        return contextlib.nullcontext()

    def set_train(self, model, training: bool):
        model.train(training)
        return model

    def call(self, model, x):
        """`model(x)` without recording gradients."""
        with self.torch.no_grad():
            return model(x)

    def exits(self, model, x) -> list[np.ndarray]:
        """Every exit's logits of `model.forward_exits(x)`."""
        with self.torch.no_grad():
            return [self.numpy(o) for o in model.forward_exits(x)]

    def run(self, layer, *arrays) -> np.ndarray:
        """A layer on float32 copies of `arrays`."""
        with self.torch.no_grad():
            return self.numpy(layer(*(self.tensor(np.asarray(a, np.float32)) for a in arrays)))

    def multi_exit_loss(self, outputs, labels: np.ndarray, **kwargs) -> float:
        return float(self.package.multi_exit_loss(outputs, self.tensor(labels.astype(np.int64)), **kwargs))

    def gradients(self, model, x, labels: np.ndarray) -> dict[str, np.ndarray]:
        """d(multi-exit loss)/d(parameter) of every trainable parameter, by canonical name."""
        model.zero_grad(set_to_none=True)
        self.package.multi_exit_loss(model.forward_exits(x), self.tensor(labels.astype(np.int64))).backward()
        return {
            name: np.zeros(tuple(p.shape), np.float32) if p.grad is None else self.numpy(p.grad)
            for name, p in model.named_parameters() if p.requires_grad
        }

    def trainable_names(self, model) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def engine(self, model, thresholds, gears=None, **kwargs):
        """The early-exit engine; PyTorch runs any batch size, so `gears` (MindSpore's) changes nothing."""
        return self.engine_module.AdaptiveDVT(model, thresholds, **kwargs)

    def device_missing(self, device: str) -> str | None:
        if device == "cuda" and not self.torch.cuda.is_available():
            return "no CUDA device for PyTorch on this machine"
        return None

    def activate(self, device: str) -> None:
        if device == "cuda":
            # TF32 would round matmul inputs to 10 mantissa bits; parity is measured in fp32.
            self.torch.backends.cuda.matmul.allow_tf32 = False
            self.torch.backends.cudnn.allow_tf32 = False

    def apply(self, model, fn, x: np.ndarray, device: str = "cpu"):
        """`fn(model, x)` on `device` without gradients, its tensors as NumPy arrays; the model goes back to the CPU."""
        model.to(device)
        try:
            with self.torch.no_grad():
                return _to_numpy(fn(model, self.torch.from_numpy(x).to(device)), self.numpy)
        finally:
            model.to("cpu")

    def trace(self, model, fn, x: np.ndarray, pattern, device: str = "cpu") -> list[tuple[str, list]]:
        """(module name, its outputs as NumPy arrays) of every module whose name matches `pattern`, in the order
        they ran during `fn(model, x)`."""
        return _traced(self, model.named_modules(), lambda: self.apply(model, fn, x, device), pattern)

    def sgd_step(self, model, x: np.ndarray, labels: np.ndarray, learning_rate: float, loss: str, device: str = "cpu"):
        """One plain SGD step on `model` (in its current train/eval mode) with the multi-exit loss ("multi_exit")
        or the cross-entropy ("cross_entropy"); the loss as a float."""
        functional = self.torch.nn.functional
        loss_fn = self.package.multi_exit_loss if loss == "multi_exit" else functional.cross_entropy
        model.to(device)
        try:
            optimizer = self.torch.optim.SGD(model.parameters(), lr=learning_rate)
            optimizer.zero_grad()
            value = loss_fn(model(self.torch.from_numpy(x).to(device)), self.torch.from_numpy(labels).to(device))
            value.backward()
            optimizer.step()
            return float(value.detach().cpu())
        finally:
            model.to("cpu")

    def canonical(self, model) -> dict[str, np.ndarray]:
        return self.convert.to_canonical(model)

    def layouts(self, images: np.ndarray) -> dict:
        """The same images held in other memory layouts."""
        x = self.torch.from_numpy(images)
        wide = self.torch.zeros(*images.shape[:3], 2 * images.shape[3])
        wide[..., ::2] = x
        return {"channels-last": x.to(memory_format=self.torch.channels_last), "strided view": wide[..., ::2],
                "transposed view": x.transpose(2, 3).contiguous().transpose(2, 3)}


class MindSporeBackend:
    name = "mindspore"
    modes = ("pynative", "graph")

    def __init__(self):
        import mindspore as ms
        from mindspore.nn.utils import no_init_parameters

        import dvt_mindspore
        from dvt_mindspore import convert, engine, layers, vt
        from dvt_torch.convert import to_canonical

        self.ms, self.package, self.convert, self.layers, self.vt = ms, dvt_mindspore, convert, layers, vt
        self.engine_module, self._torch_canonical = engine, to_canonical
        self.no_init_parameters = no_init_parameters
        self._graphs: dict = {}

    def tensor(self, array: np.ndarray):
        return self.ms.Tensor(np.ascontiguousarray(array))

    def numpy(self, tensor) -> np.ndarray:
        return tensor.asnumpy()

    def build(self, config):
        return self.set_train(self.package.build_model(config), False)

    def create_model(self, name: str, **overrides):
        return self.package.create_model(name, **overrides)

    def twin(self, torch_model):
        """A MindSpore model holding `torch_model`'s weights, through the canonical format, in its train/eval mode;
        built without initialising its parameters, which the weights overwrite (as `inference_model` builds)."""
        with self.no_init_parameters():
            model = self.build(torch_model.config)
        twin = self.convert.from_canonical(model, self._torch_canonical(torch_model))
        return self.set_train(twin, torch_model.training)

    def float64(self, model):
        return model.to(self.ms.float64)

    def mode(self, mode: str):
        """Switch to PyNative or graph mode (the root conftest restores PyNative after every test)."""
        if mode not in self.modes:
            raise ValueError(f"MindSpore runs in {self.modes}, not {mode!r}")
        self.ms.set_context(mode=self.ms.GRAPH_MODE if mode == "graph" else self.ms.PYNATIVE_MODE)
        return contextlib.nullcontext()

    def set_train(self, model, training: bool):
        model.set_train(training)
        return model

    def call(self, model, x):
        return model(x)

    def exits(self, model, x) -> list[np.ndarray]:
        return [self.numpy(o) for o in model.forward_exits(x)]

    def run(self, layer, *arrays) -> np.ndarray:
        return self.numpy(layer(*(self.tensor(np.asarray(a, np.float32)) for a in arrays)))

    def multi_exit_loss(self, outputs, labels: np.ndarray, **kwargs) -> float:
        return float(self.package.multi_exit_loss(outputs, self.tensor(labels.astype(np.int32)), **kwargs).asnumpy())

    def gradients(self, model, x, labels: np.ndarray) -> dict[str, np.ndarray]:
        """d(multi-exit loss)/d(parameter) of every trainable parameter, by canonical name."""
        params = model.trainable_params()
        grad_fn = self.ms.value_and_grad(
            lambda images, y: self.package.multi_exit_loss(model.forward_exits(images), y), None, params
        )
        _, grads = grad_fn(x, self.tensor(labels.astype(np.int32)))
        return {self.convert.release_key(p.name): self.numpy(g) for p, g in zip(params, grads)}

    def trainable_names(self, model) -> set[str]:
        return {self.convert.release_key(p.name) for p in model.trainable_params()}

    def engine(self, model, thresholds, gears="dynamic", **kwargs):
        """The engine in graph mode, by default with one graph per stage for any batch size (tests/test_gears.py
        holds the gears to the same answers). Each compile costs seconds, so the engines over one model share
        their stage graphs (one set per precision and kind of batch axis, fixed or dynamic), and each graph
        compiles a shape once per process."""
        self.mode("graph")
        engine = self.engine_module.AdaptiveDVT(model, thresholds, gears=gears, **kwargs)
        key = (id(model), engine.gears is None, engine.precision)
        if key in self._graphs:
            engine.graphs = self._graphs[key][1]
        else:
            if len(self._graphs) == GRAPHS_KEPT:
                del self._graphs[next(iter(self._graphs))]
            self._graphs[key] = (model, engine.graphs)  # the model is held, so that its id names it while kept
        return engine

    def device_missing(self, device: str) -> str | None:
        import os
        import shutil

        if device == "Ascend" and not (os.environ.get("ASCEND_HOME_PATH") or shutil.which("npu-smi")):
            return "no Ascend toolkit (ASCEND_HOME_PATH, npu-smi) on this machine"
        if device != "CPU":
            import mindspore.hal

            if not mindspore.hal.is_available(device):
                return f"this MindSpore build cannot run on {device}"
        return None

    def activate(self, device: str) -> None:
        """Put MindSpore on `device`; it fixes its device when its runtime starts, once per process, so a test
        on another device than the one it started on is skipped with the way to run it."""
        import mindspore.hal
        import pytest

        current = self.ms.get_context("device_target")
        if current != device:
            if mindspore.hal.is_initialized(current):
                pytest.skip(f"MindSpore already runs on {current} in this process and cannot move; "
                            f"run the {device} parity tests in a process of their own (pytest parity_tests -k ...)")
            self.ms.set_device(device)

    def apply(self, model, fn, x: np.ndarray, device: str = "CPU"):
        """`fn(model, x)`, its tensors as NumPy arrays (MindSpore runs where `activate` put it)."""
        return _to_numpy(fn(model, self.ms.Tensor(x)), self.numpy)

    def trace(self, model, fn, x: np.ndarray, pattern, device: str = "CPU") -> list[tuple[str, list]]:
        """(cell name, its outputs as NumPy arrays) of every cell matching `pattern`, in the order they ran
        (hooks run in PyNative mode only)."""
        return _traced(self, model.cells_and_names(), lambda: self.apply(model, fn, x, device), pattern)

    def sgd_step(self, model, x: np.ndarray, labels: np.ndarray, learning_rate: float, loss: str, device: str = "CPU"):
        loss_fn = self.package.multi_exit_loss if loss == "multi_exit" else self.ms.ops.cross_entropy
        optimizer = self.ms.nn.SGD(model.trainable_params(), learning_rate=learning_rate)
        grad_fn = self.ms.value_and_grad(lambda a, b: loss_fn(model(a), b), None, optimizer.parameters)
        value, grads = grad_fn(self.ms.Tensor(x), self.ms.Tensor(labels.astype(np.int32)))
        optimizer(grads)
        return float(value.asnumpy())

    def canonical(self, model) -> dict[str, np.ndarray]:
        return self.convert.to_canonical(model)

    def layouts(self, images: np.ndarray) -> dict:
        nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        return {"channels-last": self.ms.Tensor(nhwc.transpose(0, 3, 1, 2)),
                "strided view": self.ms.Tensor(np.repeat(images, 2, axis=3)[..., ::2]),
                "transposed view": self.ms.Tensor(nhwc).transpose(0, 3, 1, 2)}


ADAPTERS = {adapter.name: adapter for adapter in (TorchBackend, MindSporeBackend)}
_missing = sorted(set(model_backends()) - set(ADAPTERS))
if _missing:
    raise ImportError(f"backend(s) {_missing} of dvt_cli.backends.BACKENDS have no test adapter in tests/backends.py")
# Every backend of the one table that runs models, in the table's order.
BACKENDS = tuple(ADAPTERS[name] for name in model_backends())
_adapters: dict = {}


def adapter(name: str):
    """The adapter of backend `name`, built once per process (building one imports its framework)."""
    if name not in _adapters:
        _adapters[name] = ADAPTERS[name]()
    return _adapters[name]
