"""The one registry of model names, and the one way each backend builds a model of any family."""
import importlib

import pytest

from dvt_shared import registry
from dvt_shared.models import FAMILIES, build, family_of, get_model_config, list_model_names
from tests.backends import BACKENDS, adapter

# The registered names, written out by hand: what the README's model tables promise.
DVT_NAMES = ["dvt_deit_small", "dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_t2t_vit_fmnist", "dvt_t2t_vit_fmnist_static"]
SINGLE_EXIT_NAMES = ["resnet_fmnist", "vt_fpn_r50", "vt_resnet18", "vt_resnet34", "vt_resnet_fmnist"]


def test_every_name_is_listed_once_and_the_cascade_filter_partitions_them():
    assert list_model_names() == sorted(DVT_NAMES + SINGLE_EXIT_NAMES)
    assert list_model_names(cascade=True) == DVT_NAMES and list_model_names(cascade=False) == SINGLE_EXIT_NAMES
    assert all(family_of(get_model_config(name)).cascade for name in DVT_NAMES)
    assert not any(family_of(get_model_config(name)).cascade for name in SINGLE_EXIT_NAMES)
    assert list_model_names("vt_resnet*") == ["vt_resnet18", "vt_resnet34", "vt_resnet_fmnist"]
    assert list_model_names("*fmnist*", cascade=False) == ["resnet_fmnist", "vt_resnet_fmnist"]


def test_every_registered_config_carries_its_registered_name():
    for name in list_model_names():
        assert get_model_config(name).name == name


def test_a_name_is_registered_once():
    def dvt_t2t_vit_fmnist():
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="'dvt_t2t_vit_fmnist' is registered twice"):
        registry.register_model_config(dvt_t2t_vit_fmnist)
    assert registry.CONFIGS["dvt_t2t_vit_fmnist"] is not dvt_t2t_vit_fmnist


def test_unknown_names_and_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown model name 'dvt_nope'.*dvt_t2t_vit_fmnist"):
        get_model_config("dvt_nope")
    with pytest.raises(TypeError, match="unknown config field"):
        get_model_config("dvt_t2t_vit_fmnist", depht=2)


def test_overrides_reach_the_config():
    config = get_model_config("vt_resnet_fmnist", num_classes=3, trunk={"layers": [1, 1, 1, 1]})
    assert config.num_classes == 3 and config.trunk.layers == (1, 1, 1, 1)
    assert get_model_config("vt_resnet_fmnist").num_classes == 10


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_every_backend_builds_every_family(backend):
    models = importlib.import_module(f"{adapter(backend).package.__name__}.models")
    assert set(models.BUILDERS) == set(FAMILIES)


def test_a_family_a_backend_does_not_build_is_refused_by_name():
    with pytest.raises(ValueError, match="builds no vt_fpn models"):
        build({"t2t_vit": object}, get_model_config("vt_fpn_r50"))
