"""Every backend's state dicts equal the one framework-free layout `dvt_shared.models.state_layout`
computes from a config: every key, every shape, for every family and reuse mode."""
from __future__ import annotations

import pytest

from dvt_cli.backends import BACKENDS, model_backends
from dvt_shared.models import FAMILIES, family_of, get_model_config, list_model_names, state_layout

# Release-size cascades shrunk to one block; VT-FPN at a small input (the layout does not depend on it).
SMALL = {"dvt_t2t_vit_12": {"depth": 1}, "dvt_t2t_vit_14": {"depth": 1}, "dvt_deit_small": {"depth": 1},
         "vt_fpn_r50": {"img_size": (64, 64)}}
REUSES = ("none", "feature", "relation", "both")


def _configs():
    for name in list_model_names():
        config = get_model_config(name, **SMALL.get(name, {}))
        if family_of(config).cascade:
            for reuse in REUSES:
                yield pytest.param(config.replace(reuse=reuse), id=f"{name}-{reuse}")
        else:
            yield pytest.param(config, id=name)


@pytest.fixture(scope="module", params=model_backends())
def facade(request):
    import importlib

    return importlib.import_module(BACKENDS[request.param].package)


def test_every_family_is_laid_out():
    families = {family_of(get_model_config(name)).name for name in list_model_names()}
    assert families <= set(FAMILIES) and {"t2t_vit", "deit", "vt_resnet", "resnet", "vt_fpn"} <= families


@pytest.mark.parametrize("config", _configs())
def test_state_dict_equals_the_shared_layout(facade, config):
    layout = state_layout(config)
    state = {key: tuple(value.shape) for key, value in facade.to_canonical(facade.build_model(config)).items()}
    missing, unexpected = sorted(set(layout) - set(state)), sorted(set(state) - set(layout))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert {k: v for k, v in state.items() if layout[k] != v} == {}


def test_a_cascade_layout_follows_its_derived_widths():
    config = get_model_config("dvt_t2t_vit_fmnist", reuse="both")
    layout = state_layout(config)
    second = config.stages[1].name
    assert layout[f"{second}.blocks.0.norm2.weight"] == (config.mlp_in(1),) == (config.embed_dim + config.reuse_dim,)
    assert layout[f"{config.stages[0].name}.blocks.0.norm2.weight"] == (config.embed_dim,)
    assert layout[f"{second}.relation_reuse_conv.0.weight"][0] == config.relation_hidden
    assert layout[f"{second}.tokens_to_token.project.weight"][1] == config.stem_widths(1)[-1]
    assert layout[f"{second}.pos_embed"] == (1, config.num_tokens[1], config.embed_dim)
