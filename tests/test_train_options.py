"""The training options and their recipes (dvt_shared.train_options): shipped recipes hold the release's
values, a recipe fills the defaults and the command line wins, bad recipes are refused by name."""
from __future__ import annotations

import argparse
import json

import pytest

from dvt_shared.models import list_model_names
from dvt_shared.train_options import (
    SCRATCH_LR,
    add_train_arguments,
    parse_train_args,
    read_recipe,
    shipped_recipes,
    train_option_names,
)

# The release's flags (its main.py defaults and its README's commands), by our option names.
RELEASE = {
    "release_t2t_vit_12": {"model": "dvt_t2t_vit_12", "lr": 1e-3, "weight_decay": 0.03},
    "release_t2t_vit_14": {"model": "dvt_t2t_vit_14", "lr": 5e-4, "weight_decay": 0.05},
    "release_deit_small": {"model": "dvt_deit_small", "lr": 5e-4, "weight_decay": 0.05},
}
RELEASE_COMMON = {
    "batch_size": 64, "epochs": 300, "cooldown_epochs": 10, "warmup_epochs": 20, "warmup_lr": 1e-6, "min_lr": 1e-5,
    "drop_path": 0.1, "aa": "rand-m9-mstd0.5-inc1", "random_erase": 0.25, "remode": "pixel", "recount": 1,
    "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "ema": True, "ema_decay": 0.99996, "amp": "fp16",
    "train_interpolation": "random",
}


def _parser():
    return add_train_arguments(argparse.ArgumentParser())


def test_shipped_recipes_hold_the_release_values():
    assert set(shipped_recipes()) == set(RELEASE)
    for name, specific in RELEASE.items():
        args = parse_train_args(_parser(), ["--config", name])
        for key, value in {**RELEASE_COMMON, **specific}.items():
            expected = pytest.approx(value) if isinstance(value, float) else value
            assert getattr(args, key) == expected, key
        assert args.model in list_model_names()


def test_the_command_line_wins_over_the_recipe_even_at_the_parser_default():
    default_lr = SCRATCH_LR  # what a run without --lr trains at (resolve_defaults)
    args = parse_train_args(_parser(), ["--lr", str(default_lr), "--config", "release_t2t_vit_14", "--epochs", "3"])
    assert args.lr == default_lr and args.epochs == 3  # given on the command line
    assert args.weight_decay == 0.05 and args.cooldown_epochs == 10  # from the recipe


def test_dvt_train_reads_the_recipe_too(tmp_path):
    from dvt_cli import _train_recipe, build_parser

    argv = ["train", "-c", "release_deit_small", "--epochs", "2", "--data", str(tmp_path)]
    args = build_parser(_train_recipe(argv)).parse_args(argv)
    assert (args.model, args.epochs, args.ema_decay) == ("dvt_deit_small", 2, 0.99996)
    assert _train_recipe(["predict", "--config", "nowhere"]) == {}  # only `dvt train` takes a recipe


def test_a_json_recipe_and_bad_recipes(tmp_path):
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"lr": 0.01, "aa": "rand-m7-mstd0.5"}))
    assert read_recipe(str(good)) == {"lr": 0.01, "aa": "rand-m7-mstd0.5"}
    for name, text, message in (
        ("typo.json", json.dumps({"learning_rate": 0.1}), "unknown training option"),
        ("choice.json", json.dumps({"amp": "fp8"}), "amp 'fp8' is not one of"),
        ("list.yaml", "- lr\n- 0.1\n", "must map option names"),
        ("broken.yaml", "lr: [0.1\n", "not valid YAML"),
        ("broken.json", "{", "not valid JSON"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_recipe(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="nor a shipped recipe"):
        read_recipe("release_vgg16")


def test_every_option_has_one_name():
    names = train_option_names()
    assert len(names) == len(set(names)) and "config" in names
