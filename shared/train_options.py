"""The options of the training command, `dvt train` and `python -m dvt_torch.train` alike.

Kept free of any framework so that `dvt --help` (and every command that does not train)
never imports one.
"""
from __future__ import annotations

import argparse

from .models import list_model_names

# Autocast dtypes by name; the trainer maps each to its framework's dtype.
AMP_CHOICES = ("none", "bf16", "fp16")
MODEL_DEFAULT = "dvt_t2t_vit_fmnist"


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every training option on `parser` (used by `dvt train` and `python -m dvt_torch.train`)."""
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
    model.add_argument("--head-lr-scale", type=float, default=1.0, metavar="S", help="the heads' learning rate times S")
    model.add_argument(
        "--freeze-stages", type=int, default=0, metavar="K", help="DVT: the first K stages keep their weights",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="fmnist", help="'fmnist' or a folder holding train/CLASS/*.jpg and val/CLASS/*.jpg")
    data.add_argument("--data-dir", default=None, help="directory of the four Fashion-MNIST IDX files (default: the Debian package's)")
    data.add_argument("--train-subset", type=int, default=None, metavar="N", help="train on N samples drawn once from --seed")
    data.add_argument("--test-subset", type=int, default=None, metavar="N", help="evaluate on N test samples drawn once from --seed")
    data.add_argument("--workers", type=int, default=4, help="data-loading processes (image folders only)")
    data.add_argument("--crop-padding", type=int, default=2, help="Fashion-MNIST: random crop after padding by this many pixels")
    data.add_argument("--no-flip", dest="flip", action="store_false", help="Fashion-MNIST: no random horizontal flip")
    data.add_argument("--random-erase", type=float, default=0.0, metavar="P", help="Fashion-MNIST: random erasing probability")
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    data.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    data.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix over mixup when both are on")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30)
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
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument(
        "--exit-weights", type=float, nargs="+", default=None, metavar="W",
        help="loss weight of each exit (default: all 1, the release's sum of per-exit cross-entropies)",
    )
    optim.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the global gradient norm")
    optim.add_argument("--ema", action="store_true", help="keep a timm ModelEmaV3 of the weights (also evaluated and saved)")
    optim.add_argument("--ema-decay", type=float, default=0.9998)
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
        "--local-rank", "--local_rank", type=int, default=None, metavar="N",
        help="this process's rank on its node, as torch.distributed.launch passes it (torchrun sets LOCAL_RANK instead)",
    )
    run.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: cores / local processes); on a CPU shared with other jobs, 1 thread "
        "avoids OpenMP threads spin-waiting for a descheduled sibling, which can slow steps tenfold",
    )
    run.add_argument("--out", default=None, help="output directory (default: out/train/MODEL)")
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
