import warnings

import numpy as np
import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from dvt_shared import get_model_config
from dvt_shared.flops import cumulative_flops, exit_gflops, stage_flops
from dvt_shared.token_schedule import resample_matrix_1d
from dvt_torch import DVT, layers
from dvt_torch import dvt as dvt_module

PAPER_DVT_T2T_VIT_12 = (0.47, 1.46, 3.50)


class AllExits(torch.nn.Module):
    """The model with every exit as an output: fvcore counts only what reaches an output, and an
    eval-mode DVT returns the last exit alone (without reuse, the earlier stages would count nothing)."""

    def __init__(self, model: DVT):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_exits(x)


def baddbmm_flops(inputs, outputs) -> int:
    """fvcore has no handle for baddbmm (attention logits plus the reused relations): count its
    batched product as fvcore counts bmm; the added bias, like every addition, is not counted."""
    batch, rows, inner = get_shape(inputs[1])
    return batch * rows * inner * get_shape(inputs[2])[-1]


def separable_grid(x: torch.Tensor, resample_t: torch.Tensor) -> torch.Tensor:
    """(..., s, s) -> (..., t, t), one axis at a time: the form the FLOP formula counts (s*s*t + s*t*t per map)."""
    return (((x @ resample_t).transpose(-1, -2)) @ resample_t).transpose(-1, -2)


def separable_tokens(tokens: torch.Tensor, resample_t: torch.Tensor) -> torch.Tensor:
    """`dvt_torch.layers.resample_tokens`, axis by axis."""
    batch, _, channels = tokens.shape
    src, dst = resample_t.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, src, src)
    return separable_grid(grid, resample_t).reshape(batch, channels, dst * dst).transpose(1, 2)


def separable_relations(relations: torch.Tensor, resample_t: torch.Tensor) -> torch.Tensor:
    """`dvt_torch.layers.resample_relations`, axis by axis: class row and column, then keys, then queries."""
    batch, channels, _, _ = relations.shape
    src, dst = resample_t.shape
    row = separable_grid(relations[:, :, 0, 1:].reshape(batch, channels, src, src), resample_t)
    column = separable_grid(relations[:, :, 1:, 0].reshape(batch, channels, src, src), resample_t)
    grid = relations[:, :, 1:, 1:].reshape(batch, channels, src * src, src, src)
    grid = separable_grid(grid, resample_t).reshape(batch, channels, src * src, dst * dst).transpose(2, 3)
    grid = separable_grid(grid.reshape(batch, channels, dst * dst, src, src), resample_t)
    grid = grid.reshape(batch, channels, dst * dst, dst * dst).transpose(2, 3)
    top = torch.cat((relations[:, :, :1, :1], row.reshape(batch, channels, 1, dst * dst)), dim=3)
    rest = torch.cat((column.reshape(batch, channels, dst * dst, 1), grid), dim=3)
    return torch.cat((top, rest), dim=2)


def test_separable_resampling_equals_the_model_s():
    resample_t = torch.from_numpy(resample_matrix_1d(5, 7).T.astype(np.float32))
    tokens = torch.randn(2, 25, 6)
    relations = torch.randn(2, 3, 26, 26)
    torch.testing.assert_close(separable_tokens(tokens, resample_t), layers.resample_tokens(tokens, resample_t))
    torch.testing.assert_close(separable_relations(relations, resample_t),
                               layers.resample_relations(relations, resample_t))


def fvcore_stage_counts(config, monkeypatch):
    """fvcore's count of every stage, with the resampling between grids done axis by axis.

    The model moves both grid axes in one dense product (faster in wall time on these small
    grids, at s*s*t*t multiply-adds per map); the formula counts the separable form, which is
    the resampling's cost as an algorithm, so fvcore counts that form too.
    """
    monkeypatch.setattr(layers, "resample_tokens", separable_tokens)
    monkeypatch.setattr(dvt_module, "resample_relations", separable_relations)
    model = DVT(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(AllExits(model), torch.zeros(1, config.in_chans, config.img_size, config.img_size))
        analysis.set_op_handle("aten::baddbmm", baddbmm_flops)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_module = analysis.by_module()
    return [by_module[f"model.{name}"] for name in model.stage_names]


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small", "dvt_t2t_vit_fmnist"])
def test_formula_matches_fvcore(name, monkeypatch):
    config = get_model_config(name)
    for index, (counted, formula) in enumerate(zip(fvcore_stage_counts(config, monkeypatch), stage_flops(config))):
        deviation = abs(formula - counted) / counted
        print(f"{name} stage {index}: fvcore {counted / 1e9:.4f} G, formula {formula / 1e9:.4f} G ({deviation:.3%})")
        assert deviation <= 0.01


@pytest.mark.parametrize("reuse", ["none", "feature", "relation"])
def test_formula_matches_fvcore_for_ablations(reuse, monkeypatch):
    config = get_model_config("dvt_t2t_vit_fmnist", reuse=reuse)
    for counted, formula in zip(fvcore_stage_counts(config, monkeypatch), stage_flops(config)):
        assert abs(formula - counted) <= 0.01 * counted


def test_paper_figures_for_dvt_t2t_vit_12():
    for got, paper in zip(exit_gflops(get_model_config("dvt_t2t_vit_12")), PAPER_DVT_T2T_VIT_12):
        assert abs(got - paper) / paper <= 0.03, (got, paper)


def test_static_backbone_costs_match_published():
    # T2T-ViT-12 1.78 G (DVT paper), T2T-ViT-14 4.8 G (T2T paper), DeiT-S 4.6 G (DeiT paper)
    for name, published in (("dvt_t2t_vit_12", 1.78), ("dvt_t2t_vit_14", 4.8), ("dvt_deit_small", 4.6)):
        last_stage = stage_flops(get_model_config(name, reuse="none"))[-1] / 1e9
        assert abs(last_stage - published) / published <= 0.03, (name, last_stage)


def test_cumulative_is_running_sum_and_reuse_costs_extra():
    config = get_model_config("dvt_t2t_vit_12")
    stages, cumulative = stage_flops(config), cumulative_flops(config)
    assert cumulative == (stages[0], stages[0] + stages[1], sum(stages))
    without_reuse = cumulative_flops(get_model_config("dvt_t2t_vit_12", reuse="none"))
    assert without_reuse[0] == cumulative[0]
    assert all(a < b for a, b in zip(without_reuse[1:], cumulative[1:]))
