"""The options of the training command, `dvt train` and `python -m dvt_torch.train` alike.

Kept free of any framework so that `dvt --help` (and every command that does not train)
never imports one.
"""
from __future__ import annotations

import argparse
import json
import os

from .data_config import INTERPOLATIONS as DATA_INTERPOLATIONS
from .models import list_model_names

# Defaults that depend on the run, resolved by `resolve_defaults` once the data and model are known.
SCRATCH_LR, FINETUNE_LR = 1e-3, 5e-4
SCRATCH_WARMUP, FINETUNE_WARMUP = 1.0, 0.2
MAX_AUTO_BATCH, MIN_AUTO_BATCH, MIN_STEPS_PER_EPOCH = 128, 8, 40
FMNIST_CROP_PADDING = 2
# Images of at most this many pixels a side train with pad-and-random-crop, larger ones with timm's random
# resized crop.
SMALL_IMAGE_SIDE = 64
DEFAULT_RRC_SCALE = (0.08, 1.0)
DEFAULT_COLOR_JITTER = 0.4
DEFAULT_WORKERS = 4

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
        help="'fmnist'; a folder holding train/CLASS/*.jpg and val/CLASS/*.jpg (or CLASS/*.jpg with --val-split); "
        "parquet files of encoded images with a label column (FILE.parquet or a folder of them, with --val-split; or "
        "train/ and val/ folders of them); or 'synthetic' (random images of the model's input and 10 classes, for "
        "throughput checks). Trains on the train split, evaluates on the val split",
    )
    data.add_argument("--label-column", default="label", help="parquet: the column of labels (indices or names)")
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
    data.add_argument("-j", "--workers", type=int, default=None,
                      help="data-loading processes (image folders and parquet only; default: 4, at most the CPUs)")
    data.add_argument(
        "--crop-padding", type=int, default=None,
        help="Fashion-MNIST and images of 64 px or less: random crop after padding by this many pixels (default: 2 "
        "for Fashion-MNIST, as its shipped recipe; an eighth of the side for folders, CIFAR's 4 px at 32)",
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
    data.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="image folders: area range of timm's random resized crop (default 0.08 1 above 64 px; "
                      "images of 64 px or less get pad-and-random-crop instead unless --scale, --aa or "
                      "--color-jitter is given)")
    data.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"),
                      help="image folders: aspect-ratio range of the random resized crop")
    data.add_argument(
        "--hflip", type=float, default=0.5, metavar="P",
        help="image folders: horizontal flip probability (default 0.5; use 0 for digits, text, or anything whose "
        "mirror image is another class)",
    )
    data.add_argument(
        "--color-jitter", type=float, default=None, metavar="S",
        help="image folders: colour jitter strength of timm's pipeline (default 0.4 above 64 px; timm applies it only "
        "without --aa)",
    )
    model_input = parser.add_argument_group(
        "model input (recorded with the weights, read by predict, evaluate, calibrate, serve and export)")
    model_input.add_argument(
        "--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
        help="channels and size of the model's input (H = W; default: the model's config)",
    )
    model_input.add_argument("--img-size", type=int, default=None, metavar="N",
                             help="image size (default: the model's)")
    model_input.add_argument(
        "--mean", nargs="+", default=None, metavar="M",
        help="per-channel mean of pixels in [0, 1], or 'auto' to compute it from the training images (default: the "
        "--init-weights' recorded statistics, else Fashion-MNIST's for grey and ImageNet's for RGB models)",
    )
    model_input.add_argument("--std", nargs="+", default=None, metavar="S",
                             help="per-channel standard deviation, or 'auto' (default: as --mean)")
    model_input.add_argument(
        "--interpolation", choices=DATA_INTERPOLATIONS, default=None,
        help="resampling of the evaluation resize (default: the --init-weights', else bilinear for grey and bicubic "
        "for RGB models)",
    )
    model_input.add_argument(
        "--crop-pct", type=float, default=None, metavar="F",
        help="evaluation resizes the short side to size / F, then crops the centre (default: the --init-weights', "
        "else 1 for grey and 0.875 for RGB models)",
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
    optim.add_argument(
        "--batch-size", type=int, default=None,
        help="per process (default: 128, smaller for small data sets so that an epoch has at least "
        f"{MIN_STEPS_PER_EPOCH} steps, at least {MIN_AUTO_BATCH}; the log states the choice)",
    )
    optim.add_argument(
        "--grad-accum", type=int, default=1, metavar="N",
        help="run each batch as N micro-batches whose gradients add up before the step (the same update, 1/N of "
        "the activation memory); --batch-size must be a multiple of N",
    )
    optim.add_argument("--eval-batch-size", type=int, default=500)
    optim.add_argument(
        "--lr", type=float, default=None,
        help=f"peak AdamW learning rate (default {SCRATCH_LR:g}; fine-tuning, with --init-weights: {FINETUNE_LR:g})",
    )
    optim.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    optim.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of the warm-up")
    optim.add_argument(
        "--warmup-epochs", type=float, default=None,
        help=f"linear warm-up (default {SCRATCH_WARMUP:g} epoch; fine-tuning: {FINETUNE_WARMUP:g})",
    )
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
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return read_recipe(known.config) if known.config else {}


def parse_train_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by a parser holding add_train_arguments' options, a --config recipe's values as defaults."""
    parser.set_defaults(**recipe_defaults(argv))
    return parser.parse_args(argv)


def auto_batch_size(train_size: int, world_size: int) -> int:
    """The per-process batch that gives an epoch at least MIN_STEPS_PER_EPOCH steps: a power of two from
    MIN_AUTO_BATCH to MAX_AUTO_BATCH (a set too small even for that gets its own size)."""
    per_rank = max(train_size // world_size, 1)
    batch = MAX_AUTO_BATCH
    while batch > MIN_AUTO_BATCH and per_rank // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return min(batch, per_rank)


def small_image_pipeline(args, side: int) -> bool:
    """Whether a folder of `side`-pixel images trains with pad-and-random-crop (64 px or less, unless an option
    of timm's random-resized-crop pipeline is given)."""
    return side <= SMALL_IMAGE_SIDE and args.scale is None and args.aa is None and args.color_jitter is None


def resolve_defaults(args, kind: str, train_size: int, side: int, world_size: int, fine_tuning: bool,
                     cpus: int | None = None) -> list[str]:
    """Fill the options left at None with the defaults that fit this run (in place): batch size by the data's
    size, learning rate and warm-up for fine-tuning or training from scratch, augmentation by image size. An
    option given on the command line or in a recipe is kept. Returns the notes the log prints."""
    notes = []
    if args.batch_size is None:
        args.batch_size = MAX_AUTO_BATCH if kind == "synthetic" else auto_batch_size(train_size, world_size)
        steps = max(train_size // world_size, 1) // args.batch_size
        notes.append(f"batch size {args.batch_size} per process, {steps} steps per epoch (chosen for {train_size} "
                     f"training images; --batch-size sets it)")
    if args.lr is None:
        args.lr = FINETUNE_LR if fine_tuning else SCRATCH_LR
        notes.append(f"learning rate {args.lr:g} ({'fine-tuning' if fine_tuning else 'from scratch'}; --lr sets it)")
    if args.warmup_epochs is None:
        args.warmup_epochs = FINETUNE_WARMUP if fine_tuning else SCRATCH_WARMUP
    if args.workers is None:
        args.workers = min(DEFAULT_WORKERS, cpus or os.cpu_count() or 1)
    if kind in ("folder", "parquet"):
        if small_image_pipeline(args, side):
            if args.crop_padding is None:
                args.crop_padding = max(side // 8, 1)
            notes.append(f"augmentation for {side} px images: pad by {args.crop_padding} px and random crop, "
                         f"horizontal flip p={args.hflip:g}"
                         f"{f', random erasing p={args.random_erase:g}' if args.random_erase else ''}")
        else:
            args.scale = tuple(args.scale) if args.scale is not None else DEFAULT_RRC_SCALE
            args.color_jitter = DEFAULT_COLOR_JITTER if args.color_jitter is None else args.color_jitter
            notes.append(f"augmentation for {side} px images: timm's random resized crop (scale {list(args.scale)}), "
                         f"horizontal flip p={args.hflip:g}")
    elif args.crop_padding is None:
        args.crop_padding = FMNIST_CROP_PADDING
    return notes
