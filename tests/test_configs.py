import pytest

from dvt_shared import DVTConfig, get_model_config, list_model_names


def test_registered_names():
    dvt_names = {"dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small", "dvt_t2t_vit_fmnist"}
    assert set(list_model_names(cascade=True)) >= dvt_names


@pytest.mark.parametrize(
    "name,dim,depth,heads,ratio,qkv_bias,eps",
    [
        ("dvt_t2t_vit_12", 256, 12, 4, 2.0, False, 1e-5),
        ("dvt_t2t_vit_14", 384, 14, 6, 3.0, False, 1e-5),
        ("dvt_deit_small", 384, 12, 6, 4.0, True, 1e-6),
    ],
)
def test_release_geometry(name, dim, depth, heads, ratio, qkv_bias, eps):
    c = get_model_config(name)
    assert (c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.qkv_bias, c.layernorm_eps) == (
        dim, depth, heads, ratio, qkv_bias, eps)
    assert (c.reuse_dim, c.reuse_hidden, c.reuse) == (48, 128, "both")
    assert c.num_tokens == (50, 101, 197)


def test_reuse_modes_switch_mechanisms():
    flags = {m: (get_model_config("dvt_t2t_vit_12", reuse=m).feature_reuse,
                 get_model_config("dvt_t2t_vit_12", reuse=m).relation_reuse)
             for m in ("none", "feature", "relation", "both")}
    assert flags == {"none": (False, False), "feature": (True, False), "relation": (False, True), "both": (True, True)}
    assert get_model_config("dvt_t2t_vit_12").stage_reuses(0) == (False, False)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model name 'dvt_nope'.*dvt_t2t_vit_12"):
        get_model_config("dvt_nope")
    with pytest.raises(ValueError, match="reuse must be one of"):
        get_model_config("dvt_t2t_vit_12", reuse="features")
    with pytest.raises(TypeError, match="unknown config field"):
        get_model_config("dvt_t2t_vit_12", widht=3)
    with pytest.raises(ValueError, match="not divisible"):
        get_model_config("dvt_t2t_vit_12", num_heads=5)
    with pytest.raises(ValueError, match="num_classes"):
        get_model_config("dvt_t2t_vit_12", num_classes=0)
    with pytest.raises(ValueError, match="leaves no tokens"):
        get_model_config("dvt_t2t_vit_12", img_size=4)


def test_dict_round_trip():
    c = get_model_config("dvt_deit_small", num_classes=10, img_size=160)
    assert DVTConfig.from_dict(c.to_dict()) == c
