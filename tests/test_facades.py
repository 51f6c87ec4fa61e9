"""Each backend's `__init__` is its one facade, with the same public names in every backend of the table."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from dvt_cli.backends import BACKENDS, model_backends

FACADE = ("create_model", "build_model", "list_models", "load_weights", "save_weights", "to_canonical",
          "from_canonical", "AdaptiveDVT", "export", "inference_model", "all_exit_logits", "tensor",
          "count_parameters", "read_checkpoint", "write_checkpoint", "DVT", "ReuseState", "multi_exit_loss")
TINY = dict(embed_dim=24, depth=1, num_heads=2, token_dim=8)
# each backend's own weight-file extension (the table names the format; its extension is the format's name)
OWN_FORMAT = {name: f".{BACKENDS[name].weights}" for name in model_backends()}


@pytest.fixture(scope="module", params=model_backends())
def backend(request):
    return request.param, importlib.import_module(BACKENDS[request.param].package)


def test_both_facades_have_every_name(backend):
    _, facade = backend
    assert [name for name in FACADE if not hasattr(facade, name)] == []


# The stage contract every engine keeps (dvt_shared.adaptive.AdaptiveEngine), with its parameters written by hand.
STAGE_CONTRACT = {"to_backend": ["images"], "to_numpy": ["images"], "num_images": ["images"],
                  "run_stage": ["index", "images", "state"], "take": ["images", "rows"],
                  "take_state": ["state", "rows"], "concat": ["batches"], "concat_states": ["states"],
                  "step": ["index", "images", "state"]}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_engine_keeps_the_public_stage_contract(name):
    """Every backend's engine, the ONNX Runtime one included, implements the contract with its signatures
    (nothing abstract left), and a step's survivors are the rows the decision kept, as the backend's tensors."""
    import inspect

    engine_class = importlib.import_module(BACKENDS[name].package).AdaptiveDVT
    assert not inspect.isabstract(engine_class)
    for method, parameters in STAGE_CONTRACT.items():
        signature = inspect.signature(getattr(engine_class, method))
        assert list(signature.parameters)[1:] == parameters, (name, method)


def test_a_step_splits_off_the_survivors_as_backend_tensors():
    import torch

    import dvt_torch

    model = dvt_torch.create_model("dvt_t2t_vit_fmnist", **TINY).eval()
    images = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    engine = dvt_torch.AdaptiveDVT(model, [0.5, 0.5, -1e8])
    batch = engine.to_backend(images)
    logits, _ = engine.run_stage(0, batch, None)
    threshold = float(np.median(engine.exit_policy.scores_from_logits(logits)))
    engine = dvt_torch.AdaptiveDVT(model, [threshold, threshold, -1e8])
    step = engine.step(0, batch, None)
    kept = np.flatnonzero(~step.stops)
    assert 0 < kept.size < 6 and np.array_equal(step.survivors, kept)
    assert isinstance(step.images, torch.Tensor) and isinstance(step.state.features, torch.Tensor)
    np.testing.assert_array_equal(engine.to_numpy(step.images), images[kept])
    following, _ = engine.run_stage(1, step.images, step.state)
    alone, _ = engine.run_stage(1, batch, engine.run_stage(0, batch, None)[1])
    np.testing.assert_allclose(following, alone[kept], rtol=0, atol=1e-5)


def test_create_model_keeps_the_configs_class_count_unless_overridden(backend):
    _, facade = backend
    assert facade.create_model("dvt_t2t_vit_fmnist", **TINY).config.num_classes == 10
    assert facade.create_model("dvt_t2t_vit_fmnist", num_classes=4, **TINY).config.num_classes == 4
    assert facade.create_model("resnet_fmnist").config.num_classes == 10
    assert facade.list_models("vt_resnet*") == ["vt_resnet18", "vt_resnet34", "vt_resnet_fmnist"]


@pytest.mark.parametrize("extension", [".safetensors", "own"])
def test_checkpoint_path_loads_what_save_weights_wrote(backend, extension, tmp_path):
    name, facade = backend
    path = tmp_path / ("w" + (OWN_FORMAT[name] if extension == "own" else extension))
    source = facade.create_model("dvt_t2t_vit_fmnist", **TINY)
    facade.save_weights(source, path)
    loaded = facade.create_model("dvt_t2t_vit_fmnist", checkpoint_path=path, **TINY)
    expected, got = facade.to_canonical(source), facade.to_canonical(loaded)
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_the_other_backends_format_is_refused_by_name(backend, tmp_path):
    name, facade = backend
    for other in (OWN_FORMAT[n] for n in OWN_FORMAT if n != name):
        (tmp_path / f"w{other}").write_bytes(b"not read")
        with pytest.raises(ValueError, match="convert it with `dvt convert`"):
            facade.load_weights(facade.create_model("dvt_t2t_vit_fmnist", **TINY), tmp_path / f"w{other}")


def test_timm_pretrained_error_names_a_function_that_exists():
    import timm

    import dvt_torch

    with pytest.raises(ValueError, match=r"dvt_torch\.load_weights\(model, path\)"):
        timm.create_model("dvt_t2t_vit_fmnist", pretrained=True)
    assert callable(dvt_torch.load_weights)
