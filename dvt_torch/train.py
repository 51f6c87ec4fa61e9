"""Training of DVT cascades (and their static baselines) and of the VT classifiers (VT-ResNet
and its plain ResNet) on Fashion-MNIST or an image folder.

    python -m dvt_torch.train --model dvt_t2t_vit_fmnist --epochs 30 --out runs/dvt_fmnist
    python -m dvt_torch.train --model vt_resnet_fmnist --epochs 6 --out runs/vt_fmnist
    torchrun --nproc_per_node 2 -m dvt_torch.train ...        # data-parallel, one process per device

The loss is the release's: the (optionally weighted) sum of the per-exit cross-entropies; a
VT model or ResNet has one exit, so its loss is the plain cross-entropy.
Every epoch ends with a test evaluation of every exit, a line in OUT/log.jsonl and the
checkpoint OUT/last.pt, written atomically. The checkpoint holds only tensors and plain
containers (torch.load(weights_only=True) reads it) and every random state, so --resume
continues an interrupted run to bit-identical weights on CPU, even from mid-epoch
(--max-steps). At the end OUT/final.safetensors holds the weights in the canonical format.

--batch-size is per process. Under torchrun every rank draws the same permutation per
epoch and trains on its own shard; only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dvt_shared.configs import DVTConfig
from dvt_shared.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_IMAGE_SIZE
from dvt_shared.io_utils import atomic_writer
from dvt_shared.models import ModelConfig, get_model_config, list_model_names, model_gflops
from dvt_shared.vt import VTFPNConfig
from dvt_shared.weight_format import WeightMetadata, save_canonical

from .data import (
    BatchAugment,
    epoch_indices,
    eval_batches,
    eval_transform,
    fashion_mnist_splits,
    image_folder_splits,
    seeded_subset,
    tensor_batches,
    train_transform,
)
from .checkpoint import load_weights_only
from .convert import to_canonical
from .dvt import multi_exit_loss
from .vt import build_model, exit_logits

CHECKPOINT_NAME = "last.pt"
FINAL_NAME = "final.safetensors"
FINAL_EMA_NAME = "final_ema.safetensors"
LOG_NAME = "log.jsonl"
CHECKPOINT_FORMAT = "dvt-train-checkpoint-v1"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Class token and positions are not weights to shrink (as in the DeiT/T2T recipes).
NO_WEIGHT_DECAY = ("*.cls_token", "*.pos_embed")
# Options that do not change what is computed, so they may differ when resuming.
RESUME_FREE_ARGS = frozenset(
    {"resume", "max_steps", "out", "progress", "dump_rank_weights", "workers", "data_dir", "threads"}
)
# Non-interactive logs (nohup) get a progress line this often instead of every refresh.
LOG_PROGRESS_INTERVAL_S = 60.0


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every training option on `parser` (used by `dvt train` and `python -m dvt_torch.train`)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="dvt_t2t_vit_fmnist", help=f"registered config: {', '.join(list_model_names())}")
    model.add_argument(
        "--model-overrides", default=None, metavar="JSON",
        help='JSON object of config fields to override, e.g. \'{"embed_dim": 32, "depth": 1}\'',
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

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none", help="autocast dtype (CUDA only)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
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


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(device_choice: str) -> Dist:
    """Join the torchrun process group named by RANK/WORLD_SIZE/LOCAL_RANK, if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_choice, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    dtype = AMP_DTYPES[amp]
    if dtype is None or device.type == "cuda":
        return dtype
    if amp == "fp16":
        raise ValueError("--amp fp16 needs a CUDA device (float16 autocast on CPU is slow and unstable); use --amp none on CPU")
    warnings.warn("--amp bf16 applies to CUDA only; training in float32 on CPU", stacklevel=2)
    return None


def _parse_overrides(text: str | None) -> dict:
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-overrides is not valid JSON ({exc})") from exc
    if not isinstance(overrides, dict):
        raise ValueError(f"--model-overrides must be a JSON object of config fields, got {text!r}")
    return overrides


def _build_config(args, num_classes: int) -> ModelConfig:
    """The registered config with --model-overrides applied; `stages` (DVT) and `trunk`/`vt` (VT)
    may be given in to_dict's JSON form, the latter as partial objects merged into the registered ones."""
    config = get_model_config(args.model, num_classes=num_classes)
    overrides = _parse_overrides(args.model_overrides)
    fields = config.to_dict()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} in --model-overrides; known fields: {sorted(fields)}")
    try:
        if isinstance(config, DVTConfig):
            return DVTConfig.from_dict({**fields, **overrides})
        return config.replace(**overrides)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"--model-overrides does not describe a valid config ({exc})") from exc


# ---------------------------------------------------------------- data


class _Data:
    """Train batches per epoch (sharded, resumable mid-epoch) and this rank's evaluation batches."""

    def __init__(self, args, dist_ctx: Dist):
        self.args, self.dist = args, dist_ctx
        if args.data == "fmnist":
            self.kind = "fmnist"
            self.train_set, self.test_set = fashion_mnist_splits(args.data_dir)
            self.classes = list(FASHION_MNIST_CLASSES)
            subset = seeded_subset(len(self.train_set), args.train_subset, args.seed)
            if subset is not None:
                self.train_set = self.train_set.subset(subset)
            subset = seeded_subset(len(self.test_set), args.test_subset, args.seed + 1)
            if subset is not None:
                self.test_set = self.test_set.subset(subset)
            self.augment = BatchAugment(crop_padding=args.crop_padding, flip=args.flip, erase_prob=args.random_erase)
        else:
            self.kind = "folder"
            self.train_set, self.test_set = image_folder_splits(args.data)
            self.classes = list(self.train_set.classes)
            for name, size, seed in (("train_set", args.train_subset, args.seed), ("test_set", args.test_subset, args.seed + 1)):
                subset = seeded_subset(len(getattr(self, name)), size, seed)
                if subset is not None:
                    setattr(self, name, torch.utils.data.Subset(getattr(self, name), subset.tolist()))
        per_rank = len(self.train_set) // dist_ctx.world_size
        self.steps_per_epoch = per_rank // args.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(self.train_set)} training samples over {dist_ctx.world_size} process(es) do not fill one "
                f"batch of {args.batch_size}; lower --batch-size or enlarge --train-subset"
            )

    def set_image_size(self, img_size: int) -> None:
        if self.kind == "folder":
            # The folder's transforms crop to the model's input size, known only once the config is.
            for split, transform in ((self.train_set, train_transform), (self.test_set, eval_transform)):
                folder = split.dataset if isinstance(split, torch.utils.data.Subset) else split
                folder.transform = transform(img_size)

    def train_batches(self, epoch: int, start_batch: int, augment_generator: torch.Generator):
        order = epoch_indices(len(self.train_set), epoch, self.args.seed, self.dist.rank, self.dist.world_size)
        if self.kind == "fmnist":
            for images, labels in tensor_batches(self.train_set, order, self.args.batch_size, start_batch):
                yield self.augment(images, augment_generator), labels
            return
        # Worker seeds come from this generator: fixed per (epoch, rank), independent of the global RNG.
        generator = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch * 1_009 + self.dist.rank)
        loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.args.batch_size, sampler=order[start_batch * self.args.batch_size:].tolist(),
            drop_last=True, num_workers=self.args.workers, generator=generator,
            pin_memory=self.dist.device.type == "cuda",
        )
        yield from loader

    def test_batches(self):
        if self.kind == "fmnist":
            yield from eval_batches(self.test_set, self.args.eval_batch_size, self.dist.rank, self.dist.world_size)
            return
        n, rank, world = len(self.test_set), self.dist.rank, self.dist.world_size
        shard = list(range(n * rank // world, n * (rank + 1) // world))
        yield from torch.utils.data.DataLoader(
            self.test_set, batch_size=self.args.eval_batch_size, sampler=shard, num_workers=self.args.workers,
            pin_memory=self.dist.device.type == "cuda",
        )

    def describe(self) -> dict:
        return {
            "data": self.kind if self.kind == "fmnist" else os.path.abspath(self.args.data),
            "train_samples": len(self.train_set), "test_samples": len(self.test_set), "classes": self.classes,
        }


# ---------------------------------------------------------------- random states


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _rank_state(augment_generator: torch.Generator, device: torch.device, sums: dict) -> dict:
    """Everything that differs between ranks: random states and the running sums of the epoch so far."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "augment": augment_generator.get_state(),
        "numpy": _numpy_state(),
        "sums": {k: v.clone() for k, v in sums.items()},
    }


def _restore_rank_state(state: dict, augment_generator: torch.Generator, device: torch.device) -> dict:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    augment_generator.set_state(state["augment"])
    _set_numpy_state(state["numpy"])
    return state["sums"]


def _new_sums(num_exits: int) -> dict:
    return {"loss": torch.zeros((), dtype=torch.float64), "correct": torch.zeros(num_exits, dtype=torch.int64),
            "seen": torch.zeros((), dtype=torch.int64)}


# ---------------------------------------------------------------- files


def _train_options() -> list[str]:
    """The names of the options add_train_arguments registers, in order."""
    return list(vars(add_train_arguments(argparse.ArgumentParser(add_help=False)).parse_args([])))


def _recipe(args, dist_ctx: Dist, data: _Data, config: ModelConfig) -> dict:
    import timm

    return {
        # Only the training options: a host command (`dvt train`) adds its own, such as its handler function.
        "args": {k: getattr(args, k) for k in sorted(_train_options())},
        "world_size": dist_ctx.world_size,
        "dataset": data.describe(),
        "config": config.name,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def _check_resumable(saved: dict, current: dict, path: str) -> None:
    """Refuse a resume whose recipe would compute something else than the interrupted run."""
    differences = [
        f"{key}: {saved['args'].get(key)!r} -> {value!r}"
        for key, value in current["args"].items()
        if key not in RESUME_FREE_ARGS and saved["args"].get(key) != value
    ]
    if saved["world_size"] != current["world_size"]:
        differences.append(f"world size: {saved['world_size']} -> {current['world_size']}")
    if differences:
        raise ValueError(f"cannot resume {path}: the recipe differs from the interrupted run's ({'; '.join(differences)})")


def _save_checkpoint(path: str, state: dict) -> None:
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, read with weights_only=True (tensors and plain containers only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} does not exist (run without --resume first)")
    state = load_weights_only(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} training checkpoint")
    return state


def _write_log(path: str, records: list[dict]) -> None:
    with atomic_writer(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)


def _save_weights(path: str, model: torch.nn.Module, config: ModelConfig, recipe: dict, metrics: dict) -> None:
    metadata = WeightMetadata(
        config=config, exit_flops=list(model_gflops(config)), provenance=json.dumps(recipe, sort_keys=True),
        extra={k: json.dumps(v) for k, v in metrics.items()},
    )
    save_canonical(path, to_canonical(model), metadata)


# ---------------------------------------------------------------- loop


def _all_reduce(dist_ctx: Dist, *tensors: torch.Tensor) -> list[torch.Tensor]:
    if not dist_ctx.distributed:
        return list(tensors)
    out = []
    for t in tensors:
        # gloo and nccl both reduce int64/float64; nccl wants them on the GPU.
        moved = t.to(dist_ctx.device) if dist_ctx.device.type == "cuda" else t.clone()
        dist.all_reduce(moved)
        out.append(moved.cpu())
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, num_exits: int, autocast, dist_ctx: Dist) -> list[float]:
    """Top-1 accuracy (%) of every exit over all ranks' shares of the test set."""
    model.eval()
    correct = torch.zeros(num_exits, dtype=torch.int64)
    seen = torch.zeros((), dtype=torch.int64)
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            # DistributedDataParallel holds the model as `.module`; evaluation needs no gradient sync.
            outputs = getattr(model, "module", model).forward_exits(images)
        correct += torch.stack([(o.argmax(dim=1) == labels).sum() for o in outputs]).cpu()
        seen += labels.numel()
    correct, seen = _all_reduce(dist_ctx, correct, seen)
    return [round(100.0 * int(c) / max(int(seen), 1), 4) for c in correct]


def train(args: argparse.Namespace) -> dict:
    """Train as `args` says (see add_train_arguments); returns the run's metrics."""
    dist_ctx = setup_distributed(args.device)
    try:
        return _train(args, dist_ctx)
    finally:
        if dist_ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, dist_ctx: Dist) -> dict:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_procs))
    device = dist_ctx.device
    amp_dtype = _amp_dtype(args.amp, device)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    out = args.out or os.path.join("out", "train", args.model)
    checkpoint_path, log_path = os.path.join(out, CHECKPOINT_NAME), os.path.join(out, LOG_NAME)
    # Every rank checks, so that a refusal never leaves the other ranks waiting in a collective.
    if not args.resume and os.path.exists(checkpoint_path):
        raise ValueError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it or choose another --out")
    if dist_ctx.is_main:
        os.makedirs(out, exist_ok=True)

    data = _Data(args, dist_ctx)
    config = _build_config(args, num_classes=len(data.classes))
    if isinstance(config, VTFPNConfig):
        raise ValueError(f"{config.name} is a segmentation model; this project has no segmentation data to train it on")
    if data.kind == "fmnist" and (config.in_chans, config.img_size) != (1, FASHION_MNIST_IMAGE_SIZE):
        raise ValueError(
            f"{config.name} takes {config.in_chans}-channel {config.img_size}x{config.img_size} images; Fashion-MNIST "
            f"needs a 1-channel 28x28 config such as dvt_t2t_vit_fmnist"
        )
    data.set_image_size(config.img_size)
    exit_weights = tuple(args.exit_weights) if args.exit_weights else (1.0,) * config.num_exits
    if len(exit_weights) != config.num_exits:
        raise ValueError(f"--exit-weights has {len(exit_weights)} values but {config.name} has {config.num_exits} exits")
    recipe = _recipe(args, dist_ctx, data, config)

    # The same seed on every rank gives every rank the same initial weights.
    torch.manual_seed(args.seed)
    model = build_model(config).to(device)
    optimizer = create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay,
        param_group_fn=lambda m: param_groups_weight_decay(m, args.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY),
    )
    steps_per_epoch = data.steps_per_epoch
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
            label_smoothing=args.label_smoothing, num_classes=config.num_classes,
        )
    # Mixup already smooths its soft targets; smoothing them again in the loss would double it.
    loss_smoothing = 0.0 if mixup is not None else args.label_smoothing

    # Ranks differ in dropout, augmentation and mixing draws, and each state is checkpointed.
    torch.manual_seed(args.seed + 7_919 * dist_ctx.rank)
    np.random.seed((args.seed + 7_919 * dist_ctx.rank) % 2**32)
    augment_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 104_729 * (dist_ctx.rank + 1))

    step, epochs_done, elapsed = 0, 0, 0.0
    sums = _new_sums(config.num_exits)
    history: list[dict] = []
    if args.resume:
        state = load_checkpoint(checkpoint_path)
        _check_resumable(json.loads(state["recipe"]), recipe, checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        step, epochs_done, elapsed = int(state["step"]), int(state["epoch"]), float(state["elapsed"])
        sums = _restore_rank_state(state["ranks"][dist_ctx.rank], augment_generator, device)
        # Lines logged after this checkpoint was written belong to work about to be redone.
        history = [r for r in json.loads(state["history"]) if r["epoch"] <= epochs_done]
        if dist_ctx.is_main:
            _write_log(log_path, history)
    elif dist_ctx.is_main:
        _write_log(log_path, [])

    train_model = model
    if dist_ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint() -> None:
        ranks = [None] * dist_ctx.world_size
        mine = _rank_state(augment_generator, device, sums)
        if dist_ctx.distributed:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if dist_ctx.is_main:
            _save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "recipe": json.dumps(recipe), "config": json.dumps(config.to_dict()),
                "epoch": epochs_done, "step": step, "elapsed": elapsed, "history": json.dumps(history),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ranks": ranks,
            })

    show = dist_ctx.is_main and args.progress
    interactive = sys.stderr.isatty()
    interrupted = False
    if dist_ctx.is_main:
        print(
            f"training {config.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, "
            f"{config.num_exits} exit(s){f', grids {config.grids}' if isinstance(config, DVTConfig) else ''}) on {recipe['dataset']['train_samples']} samples, "
            f"{dist_ctx.world_size} process(es) on {device}, {steps_per_epoch} steps/epoch x {args.epochs} epochs",
            flush=True,
        )
    for epoch in range(epochs_done, args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            interrupted = True
            break
        start_batch = step - epoch * steps_per_epoch
        started = time.perf_counter()
        train_model.train()
        bar = tqdm(
            total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show,
            mininterval=0.5 if interactive else LOG_PROGRESS_INTERVAL_S, dynamic_ncols=interactive, file=sys.stderr,
        )
        for images, labels in data.train_batches(epoch, start_batch, augment_generator):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with autocast():
                outputs = exit_logits(train_model(images))
                loss = multi_exit_loss(outputs, targets, exit_weights, label_smoothing=loss_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if args.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(model, step=step)
            sums["loss"] += loss.detach().double().cpu() * labels.numel()
            sums["correct"] += torch.stack([(o.argmax(dim=1) == labels).sum() for o in outputs]).cpu()
            sums["seen"] += labels.numel()
            if show:
                seen = int(sums["seen"])
                bar.set_postfix_str(
                    f"loss {float(sums['loss']) / seen:.4f} acc "
                    + "/".join(f"{100.0 * int(c) / seen:.1f}" for c in sums["correct"]),
                    refresh=False,
                )
                bar.update()
            # Stopping here, before the next batch is drawn, leaves every random state as a resume needs it;
            # a stop on an epoch's last step lets the epoch finish (evaluation, log, checkpoint) first.
            if args.max_steps is not None and step >= args.max_steps and step < (epoch + 1) * steps_per_epoch:
                interrupted = True
                break
        bar.close()
        if interrupted:
            elapsed += time.perf_counter() - started
            checkpoint()
            break

        loss_sum, correct, seen = _all_reduce(dist_ctx, sums["loss"], sums["correct"], sums["seen"])
        test_acc = evaluate(train_model, data.test_batches(), device, config.num_exits, autocast, dist_ctx)
        record = {
            "epoch": epoch + 1, "step": step, "loss": round(float(loss_sum) / int(seen), 6),
            "train_acc": [round(100.0 * int(c) / int(seen), 4) for c in correct], "test_acc": test_acc,
        }
        if ema is not None:
            record["test_acc_ema"] = evaluate(ema.module, data.test_batches(), device, config.num_exits, autocast, dist_ctx)
        epoch_time = time.perf_counter() - started
        elapsed += epoch_time
        record.update(lr=optimizer.param_groups[0]["lr"], epoch_time_s=round(epoch_time, 2), elapsed_s=round(elapsed, 2))
        history.append(record)
        epochs_done = epoch + 1
        sums = _new_sums(config.num_exits)
        if dist_ctx.is_main:
            _write_log(log_path, history)
            print(
                f"epoch {epochs_done}/{args.epochs} loss {record['loss']:.4f} train acc {record['train_acc']} "
                f"test acc {record['test_acc']}" + (f" ema {record['test_acc_ema']}" if ema is not None else "")
                + f" lr {record['lr']:.2e} {record['epoch_time_s']:.0f}s",
                flush=True,
            )
        checkpoint()

    if interrupted:
        if dist_ctx.is_main:
            print(f"stopped after {step} steps (--max-steps); continue with --resume", flush=True)
    metrics = _metrics(history, step, not interrupted, elapsed)
    if not interrupted:
        if dist_ctx.is_main:
            _save_weights(os.path.join(out, FINAL_NAME), model, config, recipe, metrics)
            if ema is not None:
                _save_weights(os.path.join(out, FINAL_EMA_NAME), ema.module, config, recipe, metrics)
            print(f"wrote {os.path.join(out, FINAL_NAME)}", flush=True)
        elif args.dump_rank_weights:
            _save_weights(os.path.join(out, f"final.rank{dist_ctx.rank}.safetensors"), model, config, recipe, metrics)
    if dist_ctx.distributed:
        dist.barrier()
    metrics["out"] = out
    return metrics


def _metrics(history: list[dict], step: int, completed: bool, elapsed: float) -> dict:
    last = history[-1] if history else {}
    metrics = {
        "completed": completed, "epochs": len(history), "steps": step, "train_time_s": round(elapsed, 2),
        "train_loss": last.get("loss"), "train_acc": last.get("train_acc"), "test_acc": last.get("test_acc"),
    }
    if history:
        metrics["best_test_acc"] = [max(r["test_acc"][k] for r in history) for k in range(len(last["test_acc"]))]
    if "test_acc_ema" in last:
        metrics["test_acc_ema"] = last["test_acc_ema"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dvt_torch.train", description="Train a DVT cascade or a VT classifier (see the module docstring).",
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        metrics = train(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
