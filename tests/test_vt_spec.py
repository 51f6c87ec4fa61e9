"""The framework-neutral VT spec: registered configs, their validation, and the FLOP formulas
(held to fvcore's count of the PyTorch models and compared with the paper's figures)."""
import warnings

import pytest

from dvt_shared.models import config_from_dict, get_model_config, list_model_names, model_gflops
from dvt_shared.vt import (
    VTFPNConfig,
    VTResNetConfig,
    VTSpec,
    plain_resnet,
    standard_fpn_macs,
    vt_fpn_macs,
    vt_resnet_macs,
    vt_total_macs,
)

# Wu et al., Table 3 (ImageNet, 224x224) and Table 6 (FPN module GFLOPs).
PAPER_VT_RESNET18_GFLOPS = 1.569
PAPER_RESNET18_GFLOPS = 1.814
PAPER_FPN_GFLOPS = {(800, 1216): (55.1, 8.5), (473, 473): (12.8, 2.0)}


def test_registered_names_and_paper_geometry():
    vt_names = {"vt_resnet18", "vt_resnet34", "vt_fpn_r50", "vt_resnet_fmnist", "resnet_fmnist"}
    assert vt_names <= set(list_model_names(cascade=False))
    c = get_model_config("vt_resnet18")
    assert (c.vt_modules, c.vt.tokens, c.feature_channels, c.vt.token_dim, c.feature_size) == (2, 16, 256, 1024, 14)
    fpn = get_model_config("vt_fpn_r50")
    assert (fpn.vt.tokens, fpn.vt.token_dim, fpn.fpn_channels, fpn.trunk.stage_channels) == (
        8, 1024, 256, (256, 512, 1024, 2048))
    assert fpn.level_sizes((800, 1216)) == ((200, 304), (100, 152), (50, 76), (25, 38))
    small = get_model_config("vt_resnet_fmnist")
    assert (small.img_size, small.in_chans, small.num_classes, small.feature_size) == (28, 1, 10, 7)
    baseline = get_model_config("resnet_fmnist")
    assert baseline.family == "resnet" and baseline.trunk == small.trunk


def test_paper_defaults_for_every_open_choice():
    spec = VTSpec(tokens=16, token_dim=1024)
    assert (spec.qk_dim, spec.mlp_hidden, spec.projector_qk_dim(256)) == (512, 1024, 256)
    assert spec.scale(512) == 1.0 and VTSpec(16, 1024, attention_scale="inverse_sqrt").scale(64) == 0.125
    assert spec.projects_values(256) and not spec.projects_values(1024)
    assert VTSpec(16, 1024, value_projection="always").projects_values(1024)
    assert get_model_config("vt_fpn_r50").projector_tokens == "own_level"


@pytest.mark.parametrize("name", ["vt_resnet18", "vt_fpn_r50", "resnet_fmnist"])
def test_dict_round_trip(name):
    config = get_model_config(name, num_classes=7)
    assert config_from_dict(config.to_dict()) == config
    assert get_model_config(name, num_classes=7) == config
    assert type(config_from_dict(get_model_config("dvt_t2t_vit_fmnist").to_dict())).__name__ == "DVTConfig"


def test_overrides_merge_into_nested_specs():
    config = get_model_config("vt_resnet18", img_size=64, vt={"tokens": 4}, trunk={"layers": [1, 1, 1, 1]})
    assert (config.vt.tokens, config.vt.token_dim, config.trunk.layers, config.img_size) == (4, 1024, (1, 1, 1, 1), 64)
    assert get_model_config("vt_fpn_r50", img_size=[64, 96]).img_size == (64, 96)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model name 'vt_nope'.*vt_fpn_r50.*vt_resnet18"):
        get_model_config("vt_nope")
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['widht'\]"):
        get_model_config("vt_resnet18", widht=3)
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['tokenz'\] for VTSpec"):
        get_model_config("vt_resnet18", vt={"tokenz": 3})
    with pytest.raises(ValueError, match="attention_scale must be one of"):
        VTSpec(16, 64, attention_scale="sqrt")
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        VTSpec(0, 64)
    with pytest.raises(ValueError, match="needs a VTSpec"):
        get_model_config("vt_resnet18", vt_modules=0)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        get_model_config("vt_fpn_r50", img_size=(0, 8))
    with pytest.raises(ValueError, match="unknown model family 'vt_bogus'"):
        config_from_dict(dict(get_model_config("vt_resnet18").to_dict(), family="vt_bogus"))


# ---------------------------------------------------------------- FLOPs


def fvcore_count(config, size) -> int:
    import torch
    from fvcore.nn import FlopCountAnalysis

    from dvt_torch import build_model

    model = build_model(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, torch.zeros(1, config.in_chans, *size))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total()


FVCORE_CASES = [
    ("vt_resnet18", {}),
    ("vt_resnet34", {}),
    ("vt_resnet_fmnist", {}),
    ("resnet_fmnist", {}),
    ("vt_resnet_fmnist", {"vt": {"attention_scale": "inverse_sqrt", "value_projection": "always", "tokens": 5}}),
    ("vt_resnet_fmnist", {"vt_modules": 3, "vt": {"token_dim": 64, "qk_ratio": 0.25, "projector_qk_ratio": 0.5}}),
    ("vt_fpn_r50", {"img_size": (96, 128)}),
    ("vt_fpn_r50", {"img_size": (70, 90), "projector_tokens": "all_levels", "num_classes": 5}),
]


@pytest.mark.parametrize("name,overrides", FVCORE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FVCORE_CASES)])
def test_formula_matches_fvcore(name, overrides):
    config = get_model_config(name, **overrides)
    size = config.img_size if isinstance(config, VTFPNConfig) else (config.img_size, config.img_size)
    counted, formula = fvcore_count(config, size), vt_total_macs(config)
    print(f"{name} {overrides}: fvcore {counted / 1e9:.4f} G, formula {formula / 1e9:.4f} G")
    assert abs(formula - counted) <= 0.01 * counted


def test_plain_resnet18_is_timms_count_and_matches_fvcore():
    config = plain_resnet(get_model_config("vt_resnet18"))
    assert abs(vt_total_macs(config) - fvcore_count(config, (224, 224))) <= 0.01 * vt_total_macs(config)


def test_vt_resnet18_against_the_paper():
    vt, plain = get_model_config("vt_resnet18"), plain_resnet(get_model_config("vt_resnet18"))
    ours_vt, ours_plain = model_gflops(vt)[0], model_gflops(plain)[0]
    # BatchNorm (counted by fvcore, 0.3%) is the whole difference from the paper's ResNet-18
    assert abs(ours_plain - PAPER_RESNET18_GFLOPS) / PAPER_RESNET18_GFLOPS <= 0.005, ours_plain
    assert abs(ours_vt - PAPER_VT_RESNET18_GFLOPS) / PAPER_VT_RESNET18_GFLOPS <= 0.03, ours_vt
    # the VT modules cost under a third of the stage they replace
    assert vt_resnet_macs(vt).last_stage < vt_resnet_macs(plain).last_stage / 3


@pytest.mark.parametrize("size", sorted(PAPER_FPN_GFLOPS))
def test_fpn_module_reduction_against_the_paper(size):
    config = get_model_config("vt_fpn_r50")
    standard, ours = standard_fpn_macs(config, size).fpn_module / 1e9, vt_fpn_macs(config, size).fpn_module / 1e9
    paper_standard, paper_vt = PAPER_FPN_GFLOPS[size]
    print(f"{size}: standard FPN {standard:.2f} G (paper {paper_standard}), VT-FPN {ours:.2f} G (paper {paper_vt})")
    assert abs(standard - paper_standard) / paper_standard <= 0.01
    assert abs(ours - paper_vt) / paper_vt <= 0.05
    assert standard / ours > 6.0
    # the trunk and head are the same in both
    assert standard_fpn_macs(config, size).trunk == vt_fpn_macs(config, size).trunk


def test_single_exit_gflops_for_weight_metadata():
    config = get_model_config("vt_resnet_fmnist")
    assert model_gflops(config) == (vt_resnet_macs(config).total / 1e9,)
    assert isinstance(config, VTResNetConfig) and config.num_exits == 1
    fpn = get_model_config("vt_fpn_r50")
    assert model_gflops(fpn) == (vt_fpn_macs(fpn).total / 1e9,)
