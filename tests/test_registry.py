"""The one registry of model names, and the one way each backend builds a model of any family."""
import importlib

import pytest

from dvt_shared import registry
from dvt_shared.models import FAMILIES, build, family_of, get_model_config, list_model_names
from tests.backends import BACKENDS, adapter


def test_every_name_is_listed_once_and_the_cascade_filter_partitions_them():
    names = list_model_names()
    assert names == sorted(set(names)) == sorted(registry.CONFIGS)
    cascades, single = list_model_names(cascade=True), list_model_names(cascade=False)
    assert sorted(cascades + single) == names and not set(cascades) & set(single)
    assert all(family_of(get_model_config(name)).cascade for name in cascades)
    assert not any(family_of(get_model_config(name)).cascade for name in single)
    assert list_model_names("dvt_*") == [name for name in names if name.startswith("dvt_")]


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
