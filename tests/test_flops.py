import warnings

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from dvt_shared import get_config
from dvt_shared.flops import cumulative_flops, exit_gflops, stage_flops
from dvt_torch import DVT

PAPER_DVT_T2T_VIT_12 = (0.47, 1.46, 3.50)


class AllExits(torch.nn.Module):
    """The model with every exit as an output: fvcore counts only what reaches an output, and an
    eval-mode DVT returns the last exit alone (without reuse, the earlier stages would count nothing)."""

    def __init__(self, model: DVT):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_exits(x)


def fvcore_stage_counts(config):
    model = DVT(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(AllExits(model), torch.zeros(1, config.in_chans, config.img_size, config.img_size))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_module = analysis.by_module()
    return [by_module[f"model.{name}"] for name in model.stage_names]


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small", "dvt_t2t_vit_fmnist"])
def test_formula_matches_fvcore(name):
    config = get_config(name)
    for index, (counted, formula) in enumerate(zip(fvcore_stage_counts(config), stage_flops(config))):
        deviation = abs(formula - counted) / counted
        print(f"{name} stage {index}: fvcore {counted / 1e9:.4f} G, formula {formula / 1e9:.4f} G ({deviation:.3%})")
        assert deviation <= 0.01


@pytest.mark.parametrize("reuse", ["none", "feature", "relation"])
def test_formula_matches_fvcore_for_ablations(reuse):
    config = get_config("dvt_t2t_vit_fmnist", reuse=reuse)
    for counted, formula in zip(fvcore_stage_counts(config), stage_flops(config)):
        assert abs(formula - counted) <= 0.01 * counted


def test_paper_figures_for_dvt_t2t_vit_12():
    for got, paper in zip(exit_gflops(get_config("dvt_t2t_vit_12")), PAPER_DVT_T2T_VIT_12):
        assert abs(got - paper) / paper <= 0.03, (got, paper)


def test_static_backbone_costs_match_published():
    # T2T-ViT-12 1.78 G (DVT paper), T2T-ViT-14 4.8 G (T2T paper), DeiT-S 4.6 G (DeiT paper)
    for name, published in (("dvt_t2t_vit_12", 1.78), ("dvt_t2t_vit_14", 4.8), ("dvt_deit_small", 4.6)):
        last_stage = stage_flops(get_config(name, reuse="none"))[-1] / 1e9
        assert abs(last_stage - published) / published <= 0.03, (name, last_stage)


def test_cumulative_is_running_sum_and_reuse_costs_extra():
    config = get_config("dvt_t2t_vit_12")
    stages, cumulative = stage_flops(config), cumulative_flops(config)
    assert cumulative == (stages[0], stages[0] + stages[1], sum(stages))
    without_reuse = cumulative_flops(get_config("dvt_t2t_vit_12", reuse="none"))
    assert without_reuse[0] == cumulative[0]
    assert all(a < b for a, b in zip(without_reuse[1:], cumulative[1:]))
