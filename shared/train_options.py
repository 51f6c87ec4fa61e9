"""The options of the training command, `dvt train` and `python -m dvt_torch.train` alike.

Kept free of any framework so that `dvt --help` (and every command that does not train)
never imports one.
"""
from __future__ import annotations

import argparse
import json
import os

from .models import list_model_names

# Autocast dtypes by name; the trainer maps each to its framework's dtype.
AMP_CHOICES = ("none", "bf16", "fp16")
MODEL_DEFAULT = "dvt_t2t_vit_fmnist"
# Resampling of training crops (timm's names; "random" draws bilinear or bicubic per image, as the release trains).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
# Random erasing fills (timm's RandomErasing modes): zeros, one random colour per rectangle, per-pixel noise.
ERASE_MODES = ("const", "rand", "pixel")
# The recipes shipped with the package, by name: `--config release_t2t_vit_12`.
RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every training option on `parser` (used by `dvt train` and `python -m dvt_torch.train`)."""
    parser.add_argument(
        "-c", "--config", default=None, metavar="RECIPE",
        help=f"a recipe: YAML or JSON of option values (keys as the options' names with '_', e.g. weight_decay), "
        f"or a shipped one by name ({', '.join(shipped_recipes())}); options given on the command line win",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=MODEL_DEFAULT, help=f"registered config: {', '.join(list_model_names())}")
    model.add_argument(
        "--model-overrides", default=None, metavar="JSON",
        help='JSON object of config fields to override, e.g. \'{"embed_dim": 32, "depth": 1}\'',
    )
    model.add_argument(
        "--init-weights", default=None, metavar="PATH",
        help="fine-tune: start from these weights (.safetensors, whose config is used; a release .pth/.pth.tar or a "
        "MindSpore .ckpt of the --model); heads are sized for the data's classes and start afresh, learned position "
        "embeddings are interpolated to another image size",
    )
    model.add_argument(
        "--drop-path", type=float, default=None, metavar="RATE",
        help="stochastic depth of the last block (rising linearly from 0 over the blocks; default: the config's)",
    )
    model.add_argument("--head-lr-scale", type=float, default=1.0, metavar="S", help="the heads' learning rate times S")
    model.add_argument(
        "--freeze-stages", type=int, default=0, metavar="K", help="DVT: the first K stages keep their weights",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", default="fmnist",
        help="'fmnist'; a folder holding train/CLASS/*.jpg and val/CLASS/*.jpg (or CLASS/*.jpg with --val-split); or "
        "'synthetic' (random images of the model's input and 10 classes, for throughput checks)",
    )
    data.add_argument(
        "--val-split", type=float, default=None, metavar="F",
        help="--data DIR holds CLASS/*.jpg only: hold out the fraction F of every class (drawn once from --seed) "
        "for evaluation",
    )
    data.add_argument(
        "--data-dir", default=None,
        help="directory of the four Fashion-MNIST IDX files (default: the Debian package's)",
    )
    data.add_argument(
        "--train-subset", type=int, default=None, metavar="N", help="train on N samples drawn once from --seed",
    )
    data.add_argument(
        "--test-subset", type=int, default=None, metavar="N", help="evaluate on N test samples drawn once from --seed",
    )
    data.add_argument("-j", "--workers", type=int, default=4, help="data-loading processes (image folders only)")
    data.add_argument(
        "--crop-padding", type=int, default=2, help="Fashion-MNIST: random crop after padding by this many pixels",
    )
    data.add_argument("--no-flip", dest="flip", action="store_false", help="Fashion-MNIST: no random horizontal flip")
    data.add_argument(
        "--random-erase", "--reprob", type=float, default=0.0, metavar="P", help="random erasing probability",
    )
    data.add_argument(
        "--remode", choices=ERASE_MODES, default="const", help="image folders: what random erasing fills with",
    )
    data.add_argument("--recount", type=int, default=1, metavar="N", help="image folders: rectangles erased per image")
    data.add_argument(
        "--aa", default=None, metavar="POLICY",
        help="image folders: timm's auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment) or augmix-m5-w4-d2",
    )
    data.add_argument(
        "--train-interpolation", choices=INTERPOLATIONS, default=None,
        help="image folders: resampling of training crops (default: the model's)",
    )
    data.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                      help="image folders: area range of the random resized crop")
    data.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"),
                      help="image folders: aspect-ratio range of the random resized crop")
    data.add_argument(
        "--hflip", type=float, default=0.5, metavar="P", help="image folders: horizontal flip probability",
    )
    data.add_argument(
        "--color-jitter", type=float, default=0.4, metavar="S",
        help="image folders: colour jitter strength (timm applies it only without --aa)",
    )
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    data.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    data.add_argument(
        "--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix over mixup when both are on",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30, help="epochs of the cosine schedule")
    optim.add_argument(
        "--cooldown-epochs", type=int, default=0, metavar="N", help="then N more epochs at --min-lr (timm's cooldown)",
    )
    optim.add_argument("--batch-size", type=int, default=128, help="per process")
    optim.add_argument(
        "--grad-accum", type=int, default=1, metavar="N",
        help="run each batch as N micro-batches whose gradients add up before the step (the same update, 1/N of "
        "the activation memory); --batch-size must be a multiple of N",
    )
    optim.add_argument("--eval-batch-size", type=int, default=500)
    optim.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    optim.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    optim.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of the warm-up")
    optim.add_argument("--warmup-epochs", type=float, default=1.0)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--label-smoothing", "--smoothing", type=float, default=0.1)
    optim.add_argument(
        "--exit-weights", type=float, nargs="+", default=None, metavar="W",
        help="loss weight of each exit (default: all 1, the release's sum of per-exit cross-entropies)",
    )
    optim.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the global gradient norm")
    optim.add_argument(
        "--ema", "--model-ema", action="store_true",
        help="keep a timm ModelEmaV3 of the weights (also evaluated, saved and a candidate for best.safetensors)",
    )
    optim.add_argument("--ema-decay", "--model-ema-decay", type=float, default=0.9998)
    optim.add_argument(
        "--teacher", default=None, metavar="SAFETENSORS",
        help="distil from this trained classifier (canonical weights, e.g. weights/resnet_fmnist.safetensors): "
        "DeiT's hard-label distillation, the loss being the mean of the label loss and the cross-entropy "
        "against the teacher's top-1 class, at every exit",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--amp", choices=AMP_CHOICES, default="none",
        help="autocast dtype: fp16 (with loss scaling) on CUDA, or slowly on a CPU to try a recipe; bf16 on CUDA "
        "or on a CPU with native bf16 (AVX512-BF16 or AMX)",
    )
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument(
        "--channels-last", action="store_true",
        help="images and convolution weights in channels-last memory layout (faster convolutions on GPUs)",
    )
    run.add_argument(
        "--compile", action="store_true",
        help="train through torch.compile (the first steps compile; then fused kernels, mostly worth it on GPUs)",
    )
    run.add_argument("--compile-backend", default="inductor", metavar="NAME", help="torch.compile's backend")
    run.add_argument(
        "--local-rank", "--local_rank", type=int, default=None, metavar="N",
        help="this process's rank on its node, as torch.distributed.launch passes it "
        "(torchrun sets LOCAL_RANK instead)",
    )
    run.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: cores / local processes); on a CPU shared with other jobs, 1 thread "
        "avoids OpenMP threads spin-waiting for a descheduled sibling, which can slow steps tenfold",
    )
    run.add_argument("--out", "--output", default=None, help="output directory (default: out/train/MODEL)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument(
        "--max-steps", type=int, default=None, metavar="N",
        help="stop after N optimiser steps in all, as if interrupted (last.pt is written; --resume continues)",
    )
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument(
        "--dump-rank-weights", action="store_true",
        help="every rank > 0 also writes its final weights to OUT/final.rankR.safetensors (to check that ranks agree)",
    )
    return parser


def train_option_names() -> list[str]:
    """The destination names of every training option, in order."""
    return list(vars(add_train_arguments(argparse.ArgumentParser(add_help=False)).parse_args([])))


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped in dvt_shared/recipes."""
    return sorted(os.path.splitext(f)[0] for f in os.listdir(RECIPE_DIR) if f.endswith((".yaml", ".json")))


def recipe_path(name: str) -> str:
    """The file of recipe `name`: a path to a .yaml/.yml/.json file, or the name of a shipped recipe."""
    if os.path.isfile(name):
        return name
    for ext in (".yaml", ".json"):
        shipped = os.path.join(RECIPE_DIR, name + ext)
        if os.path.isfile(shipped):
            return shipped
    raise FileNotFoundError(f"--config {name}: no such file, nor a shipped recipe ({', '.join(shipped_recipes())})")


def read_recipe(name: str) -> dict:
    """The option values recipe `name` sets, checked against the training options' names and choices."""
    path = recipe_path(name)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path} is not valid JSON: {exc}") from exc
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must map option names to values, got {type(values).__name__}")
    actions = {a.dest: a for a in add_train_arguments(argparse.ArgumentParser(add_help=False))._actions}
    unknown = sorted(set(values) - set(actions) - {"help"})
    if unknown or "config" in values:
        raise ValueError(
            f"--config {path}: unknown training option(s) {unknown or ['config']}; known: {sorted(actions)}"
        )
    for key, value in values.items():
        choices = actions[key].choices
        if choices is not None and value not in choices:
            raise ValueError(f"--config {path}: {key} {value!r} is not one of {list(choices)}")
    return values


def recipe_defaults(argv: list[str]) -> dict:
    """The values of the recipe `argv` names with -c/--config (none: {}), to become the parser's defaults so
    that options given on the command line still win (timm's train.py reads its --config the same way)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return read_recipe(known.config) if known.config else {}


def parse_train_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by a parser holding add_train_arguments' options, a --config recipe's values as defaults."""
    parser.set_defaults(**recipe_defaults(argv))
    return parser.parse_args(argv)
