"""The backends every backend-parametrised test runs on, each behind one small adapter (Keras 3 style).

A test written against the `backend` fixture (tests/conftest.py) runs once per entry of
`BACKENDS`; a new backend is one more adapter here. Each adapter imports its framework when
it is built, so collecting the tests imports neither.
"""
from __future__ import annotations

import contextlib

import numpy as np


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

        import dvt_mindspore
        from dvt_mindspore import convert, engine, layers, vt
        from dvt_torch.convert import to_canonical

        self.ms, self.package, self.convert, self.layers, self.vt = ms, dvt_mindspore, convert, layers, vt
        self.engine_module, self._torch_canonical = engine, to_canonical

    def tensor(self, array: np.ndarray):
        return self.ms.Tensor(np.ascontiguousarray(array))

    def numpy(self, tensor) -> np.ndarray:
        return tensor.asnumpy()

    def build(self, config):
        return self.set_train(self.package.build_model(config), False)

    def create_model(self, name: str, **overrides):
        return self.package.create_model(name, **overrides)

    def twin(self, torch_model):
        """A MindSpore model holding `torch_model`'s weights, through the canonical format."""
        return self.convert.from_canonical(self.build(torch_model.config), self._torch_canonical(torch_model))

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
        """The engine in graph mode, by default with one graph per stage for any batch size: every gear
        is a compile of seconds, and tests/test_gears.py holds the gears to the same answers."""
        self.mode("graph")
        return self.engine_module.AdaptiveDVT(model, thresholds, gears=gears, **kwargs)

    def layouts(self, images: np.ndarray) -> dict:
        nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        return {"channels-last": self.ms.Tensor(nhwc.transpose(0, 3, 1, 2)),
                "strided view": self.ms.Tensor(np.repeat(images, 2, axis=3)[..., ::2]),
                "transposed view": self.ms.Tensor(nhwc).transpose(0, 3, 1, 2)}


BACKENDS = (TorchBackend, MindSporeBackend)
