"""Training of DVT cascades (and their static baselines) and of the VT classifiers (VT-ResNet
and its plain ResNet) on Fashion-MNIST or an image folder.

    python -m dvt_torch.train --model dvt_t2t_vit_fmnist --epochs 30 --out runs/dvt_fmnist
    python -m dvt_torch.train --model vt_resnet_fmnist --epochs 6 --out runs/vt_fmnist
    torchrun --nproc_per_node 2 -m dvt_torch.train ...        # data-parallel, one process per device

The loss is the release's: the (optionally weighted) sum of the per-exit cross-entropies; a
VT model or ResNet has one exit, so its loss is the plain cross-entropy.
Every epoch ends with a test evaluation of every exit, a line in OUT/log.jsonl, its curves
in OUT/log.png and the checkpoint OUT/last.pt, all written atomically. The checkpoint holds only tensors and plain
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
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dvt_shared.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_IMAGE_SIZE
from dvt_shared.io_utils import atomic_write_png, atomic_writer
from dvt_shared.models import ModelConfig, family_of, get_model_config, model_gflops
from dvt_shared.train_options import MODEL_DEFAULT, add_train_arguments
from dvt_shared.weight_format import WeightMetadata, save_canonical

from .data import (
    BatchAugment,
    epoch_indices,
    eval_batches,
    fashion_mnist_splits,
    folder_loader,
    folder_transforms,
    image_folder_splits,
    seeded_subset,
    tensor_batches,
)
from .checkpoint import load_weights_only
from .convert import to_canonical
from .dvt import multi_exit_loss
from .finetune import InitWeights, freeze_stages, head_lr_groups, load_init_weights, read_init_weights, recorded_config
from .models import build_model
from .vt import exit_logits

CHECKPOINT_NAME = "last.pt"
FINAL_NAME = "final.safetensors"
FINAL_EMA_NAME = "final_ema.safetensors"
LOG_NAME = "log.jsonl"
PLOT_NAME = "log.png"
CHECKPOINT_FORMAT = "dvt-train-checkpoint-v1"
# by dvt_shared.train_options.AMP_CHOICES
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Class token and positions are not weights to shrink (as in the DeiT/T2T recipes).
NO_WEIGHT_DECAY = ("*.cls_token", "*.pos_embed")
# Options that do not change what is computed, so they may differ when resuming.
RESUME_FREE_ARGS = frozenset(
    {"resume", "max_steps", "out", "progress", "dump_rank_weights", "workers", "data_dir", "threads", "epochs",
     "local_rank"}
)
# Non-interactive logs (nohup) get a progress line this often instead of every refresh.
LOG_PROGRESS_INTERVAL_S = 60.0


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


def setup_distributed(device_choice: str, local_rank: int | None = None) -> Dist:
    """Join the process group named by RANK/WORLD_SIZE (torchrun, or torch.distributed.launch, which may
    pass the local rank as --local-rank rather than LOCAL_RANK), if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    device = _resolve_device(device_choice, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


# CPU flags of native bf16 arithmetic (x86: AVX512-BF16 dot products, AMX tiles; Arm: BF16 extension).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (otherwise bf16 autocast emulates it, slower than fp32)."""
    mkldnn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if mkldnn_check is not None and not mkldnn_check():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = {word for line in handle if line.startswith(("flags", "Features")) for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    dtype = AMP_DTYPES[amp]
    # fp16 runs anywhere (on a CPU slowly, for trying a GPU recipe): what overflows fp16 computes in float32
    if dtype is None or device.type == "cuda" or amp == "fp16":
        return dtype
    if not cpu_has_native_bf16():
        raise ValueError(
            "--amp bf16 on CPU needs native bf16 arithmetic (CPU flag avx512_bf16 or amx_bf16, and a oneDNN build "
            "that uses it); this CPU would emulate bf16 more slowly than float32: use --amp none"
        )
    return dtype


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


def _build_config(args, num_classes: int, init: InitWeights | None = None) -> ModelConfig:
    """The registered config (or, fine-tuning, the --init-weights file's) with --model-overrides applied;
    `stages` (DVT) and `trunk`/`vt` (VT) may be given in to_dict's JSON form, the latter as partial objects
    merged into the registered ones."""
    if init is None or init.config is None:
        config = get_model_config(args.model, num_classes=num_classes)
    else:
        # a file's own config names its model; --model, where changed from its default, must agree with it
        config = recorded_config(init, args.model, args.model != MODEL_DEFAULT, num_classes)
    overrides = _parse_overrides(args.model_overrides)
    fields = config.to_dict()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} in --model-overrides; known fields: {sorted(fields)}")
    try:
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

    def set_model_input(self, config) -> None:
        if self.kind == "folder":
            # How a folder's images are read (grey or RGB) and cropped and normalised follows the model,
            # known only once the config is (its class count comes from the folders).
            loader = folder_loader(config)
            for split, transform in zip((self.train_set, self.test_set), folder_transforms(config)):
                folder = split.dataset if isinstance(split, torch.utils.data.Subset) else split
                folder.loader, folder.transform = loader, transform

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
        "sums": {k: v.cpu().clone() for k, v in sums.items()},
    }


def _restore_rank_state(state: dict, augment_generator: torch.Generator, device: torch.device) -> dict:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    augment_generator.set_state(state["augment"])
    _set_numpy_state(state["numpy"])
    return {k: v.to(device) for k, v in state["sums"].items()}


def _new_sums(num_exits: int, device: torch.device) -> dict:
    return {"loss": torch.zeros((), dtype=torch.float64, device=device),
            "correct": torch.zeros(num_exits, dtype=torch.int64, device=device),
            "seen": torch.zeros((), dtype=torch.int64, device=device)}


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


def _write_epoch_files(out: str, history: list[dict]) -> None:
    """OUT/log.jsonl (one line per epoch) and, once there is an epoch, its curves in OUT/log.png."""
    with atomic_writer(os.path.join(out, LOG_NAME), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in history)
    if history:
        plot_history(history, os.path.join(out, PLOT_NAME))


def history_figure(history: list[dict]):
    """A matplotlib figure (Agg) of each exit's test (and train) accuracy and the training loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for k in range(len(history[0]["test_acc"])):
        line, = acc_ax.plot(epochs, [r["test_acc"][k] for r in history], "o-", label=f"exit {k} test")
        acc_ax.plot(epochs, [r["train_acc"][k] for r in history], ":", color=line.get_color(), label=f"exit {k} train")
    if "test_acc_ema" in history[0]:
        acc_ax.plot(epochs, [r["test_acc_ema"][-1] for r in history], "s--", color="black", label="last exit, EMA test")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy per exit")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    loss_ax.plot(epochs, [r["loss"] for r in history], "o-", color="tab:red", label="training loss")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_history(history: list[dict], path: str) -> None:
    """history_figure as a PNG, written atomically."""
    atomic_write_png(path, history_figure(history))


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


class TrainingRun:
    """One run: its set-up (data, model, optimisation, randomness), its state (counters, running
    sums, history) with checkpoint save and restore, and its optimisation step."""

    def __init__(self, args: argparse.Namespace, dist_ctx: Dist):
        from timm.data import Mixup
        from timm.optim import create_optimizer_v2, param_groups_weight_decay
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.args, self.dist = args, dist_ctx
        device = self.device = dist_ctx.device
        self.amp_dtype = _amp_dtype(args.amp, device)
        self.data = _Data(args, dist_ctx)
        init = read_init_weights(args.init_weights) if args.init_weights else None
        config = self.config = _build_config(args, num_classes=len(self.data.classes), init=init)
        if family_of(config).task != "classification":
            raise ValueError(f"{config.name} is a segmentation model; this project has no segmentation data to train it on")
        if self.data.kind == "fmnist" and (config.in_chans, config.img_size) != (1, FASHION_MNIST_IMAGE_SIZE):
            raise ValueError(
                f"{config.name} takes {config.in_chans}-channel {config.img_size}x{config.img_size} images; Fashion-MNIST "
                f"needs a 1-channel 28x28 config such as dvt_t2t_vit_fmnist"
            )
        self.data.set_model_input(config)
        if args.grad_accum < 1 or args.batch_size % args.grad_accum:
            raise ValueError(f"--grad-accum {args.grad_accum} must be a positive divisor of --batch-size {args.batch_size}")
        self.exit_weights = tuple(args.exit_weights) if args.exit_weights else (1.0,) * config.num_exits
        if len(self.exit_weights) != config.num_exits:
            raise ValueError(f"--exit-weights has {len(self.exit_weights)} values but {config.name} has {config.num_exits} exits")
        self.teacher = load_teacher(args.teacher, config, device) if args.teacher else None
        self.recipe = _recipe(args, dist_ctx, self.data, config)

        # The same seed on every rank gives every rank the same initial weights.
        torch.manual_seed(args.seed)
        self.model = build_model(config)
        self.init_report = load_init_weights(self.model, init) if init is not None else None
        self.frozen = freeze_stages(self.model, args.freeze_stages) if args.freeze_stages else []
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)
        on_cuda = device.type == "cuda"

        def param_groups(model):
            groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
            return head_lr_groups(groups, model, args.head_lr_scale) if args.head_lr_scale != 1.0 else groups

        self.optimizer = create_optimizer_v2(
            self.model, "adamw", lr=args.lr, weight_decay=args.weight_decay, param_group_fn=param_groups,
            # one fused kernel for the whole update on CUDA; multi-tensor (foreach) on a CPU
            **({"fused": True} if on_cuda else {"foreach": True}),
        )
        if on_cuda and torch.cuda.get_device_capability(device)[0] >= 8:
            # TF32 matmuls on Ampere and later, as timm's train.py trains (float32 range, 10-bit mantissa inputs)
            torch.set_float32_matmul_precision("high")
        self.steps_per_epoch = self.data.steps_per_epoch
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
            min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=self.steps_per_epoch,
        )
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay) if args.ema else None
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                label_smoothing=args.label_smoothing, num_classes=config.num_classes,
            )
        # Mixup already smooths its soft targets; smoothing them again in the loss would double it.
        self.loss_smoothing = 0.0 if self.mixup is not None else args.label_smoothing

        # Ranks differ in dropout, augmentation and mixing draws, and each state is checkpointed.
        torch.manual_seed(args.seed + 7_919 * dist_ctx.rank)
        np.random.seed((args.seed + 7_919 * dist_ctx.rank) % 2**32)
        self.augment_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 104_729 * (dist_ctx.rank + 1))

        self.step, self.epochs_done, self.elapsed = 0, 0, 0.0
        self.sums = _new_sums(config.num_exits, device)
        self.history: list[dict] = []
        self.train_model = self.model
        if dist_ctx.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------ state

    def save(self, path: str) -> None:
        """Write everything a resume needs (every rank's random states included; rank 0 writes)."""
        ranks = [None] * self.dist.world_size
        mine = _rank_state(self.augment_generator, self.device, self.sums)
        if self.dist.distributed:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.dist.is_main:
            _save_checkpoint(path, {
                "format": CHECKPOINT_FORMAT, "recipe": json.dumps(self.recipe), "config": json.dumps(self.config.to_dict()),
                "epoch": self.epochs_done, "step": self.step, "elapsed": self.elapsed, "history": json.dumps(self.history),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ranks": ranks,
            })

    def restore(self, path: str) -> None:
        """Continue from the checkpoint `path`, refusing one whose recipe computes something else."""
        state = load_checkpoint(path)
        saved = json.loads(state["recipe"])
        _check_resumable(saved, self.recipe, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if saved["args"]["epochs"] == self.args.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            # More (or fewer) epochs than the run was started with: the schedule is the new length's, at
            # the step reached (timm's train.py resumes a changed --epochs the same way).
            self.scheduler.step_update(num_updates=int(state["step"]))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epochs_done, self.elapsed = int(state["step"]), int(state["epoch"]), float(state["elapsed"])
        self.sums = _restore_rank_state(state["ranks"][self.dist.rank], self.augment_generator, self.device)
        # Lines logged after this checkpoint was written belong to work about to be redone.
        self.history = [r for r in json.loads(state["history"]) if r["epoch"] <= self.epochs_done]

    # ------------------------------------------------------------ step

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.autocast():
            return exit_logits(self.train_model(images))

    def loss(self, outputs: tuple[torch.Tensor, ...], targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The multi-exit loss; with a teacher, DeiT's hard distillation at every exit."""
        with self.autocast():
            loss = multi_exit_loss(outputs, targets, self.exit_weights, label_smoothing=self.loss_smoothing)
            if self.teacher is None:
                return loss
            with torch.no_grad():
                teacher_labels = self.teacher(images).argmax(dim=1)
            return (loss + multi_exit_loss(outputs, teacher_labels, self.exit_weights)) / 2

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def apply_gradients(self) -> None:
        """One optimiser, scheduler and EMA update from the gradients accumulated since the last one."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.args.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(num_updates=self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimiser step on a batch; with --grad-accum N, the batch runs as N micro-batches whose
        gradients add up to the whole batch's (the same update, 1/N of the activation memory)."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        parts = self.args.grad_accum
        batch = labels.numel()
        for index, (part_images, part_targets, part_labels) in enumerate(
            zip(images.chunk(parts), targets.chunk(parts), labels.chunk(parts))
        ):
            # DDP averages gradients across ranks once, on the last micro-batch
            last = index == parts - 1
            sync = contextlib.nullcontext() if last or not self.dist.distributed else self.train_model.no_sync()
            with sync:
                outputs = self.forward(part_images)
                loss = self.loss(outputs, part_targets, part_images)
                self.backward(loss * (part_labels.numel() / batch))
            # running sums stay on the device: no host synchronisation per step
            self.sums["loss"] += loss.detach().double() * part_labels.numel()
            self.sums["correct"] += torch.stack([(o.argmax(dim=1) == part_labels).sum() for o in outputs])
            self.sums["seen"] += part_labels.numel()
        self.apply_gradients()

    # ------------------------------------------------------------ epoch

    def train_epoch(self, epoch: int, show: bool) -> bool:
        """Train `epoch` from where the run stands; True when --max-steps stopped it part-way."""
        start_batch = self.step - epoch * self.steps_per_epoch
        interactive = sys.stderr.isatty()
        self.train_model.train()
        bar = tqdm(
            total=self.steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{self.args.epochs}",
            disable=not show, mininterval=0.5 if interactive else LOG_PROGRESS_INTERVAL_S,
            dynamic_ncols=interactive, file=sys.stderr,
        )
        max_steps = self.args.max_steps
        try:
            for images, labels in self.data.train_batches(epoch, start_batch, self.augment_generator):
                self.train_step(images, labels)
                if show:
                    # the running figures are read (a host synchronisation on a GPU) every 25 steps only
                    if self.step % 25 == 0:
                        seen = int(self.sums["seen"])
                        bar.set_postfix_str(
                            f"loss {float(self.sums['loss']) / seen:.4f} acc "
                            + "/".join(f"{100.0 * int(c) / seen:.1f}" for c in self.sums["correct"]),
                            refresh=False,
                        )
                    bar.update()
                # Stopping here, before the next batch is drawn, leaves every random state as a resume needs it;
                # a stop on an epoch's last step lets the epoch finish (evaluation, log, checkpoint) first.
                if max_steps is not None and self.step >= max_steps and self.step < (epoch + 1) * self.steps_per_epoch:
                    return True
            return False
        finally:
            bar.close()

    def end_epoch(self, epoch: int, started: float) -> dict:
        """Evaluate every exit (and the EMA's), append the epoch's record to the history, reset the sums."""
        loss_sum, correct, seen = _all_reduce(self.dist, self.sums["loss"], self.sums["correct"], self.sums["seen"])
        train_time = time.perf_counter() - started
        num_exits = self.config.num_exits
        record = {
            "epoch": epoch + 1, "step": self.step, "loss": round(float(loss_sum) / int(seen), 6),
            "train_acc": [round(100.0 * int(c) / int(seen), 4) for c in correct],
            "test_acc": evaluate(self.train_model, self.data.test_batches(), self.device, num_exits, self.autocast, self.dist),
        }
        if self.ema is not None:
            record["test_acc_ema"] = evaluate(
                self.ema.module, self.data.test_batches(), self.device, num_exits, self.autocast, self.dist
            )
        epoch_time = time.perf_counter() - started
        self.elapsed += epoch_time
        # training images per second over every rank (the epoch's training part; after a mid-epoch resume
        # the images before the interruption count too)
        record.update(lr=self.optimizer.param_groups[0]["lr"], epoch_time_s=round(epoch_time, 2), elapsed_s=round(self.elapsed, 2),
                      train_images_per_s=round(int(seen) / train_time, 1))
        self.history.append(record)
        self.epochs_done = epoch + 1
        self.sums = _new_sums(num_exits, self.device)
        return record


def load_teacher(path: str, config: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A shipped classifier in canonical format, frozen in eval mode, to distil from."""
    from dvt_shared.weight_format import load_canonical

    from .convert import from_canonical

    tensors, metadata = load_canonical(path)
    teacher_config = metadata.config
    if (teacher_config.num_classes, teacher_config.in_chans, teacher_config.img_size) != (
        config.num_classes, config.in_chans, config.img_size
    ):
        raise ValueError(
            f"--teacher {path} classifies {teacher_config.in_chans}-channel {teacher_config.img_size}x"
            f"{teacher_config.img_size} images into {teacher_config.num_classes} classes; {config.name} needs "
            f"{config.in_chans}-channel {config.img_size}x{config.img_size} images and {config.num_classes} classes"
        )
    teacher = from_canonical(build_model(teacher_config), tensors, source=path).to(device).eval()
    teacher.requires_grad_(False)
    return _LastExit(teacher).eval()


class _LastExit(torch.nn.Module):
    """A classifier's last (or only) exit as one tensor, whatever its model returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exit_logits(self.model(x))[-1]


def train(args: argparse.Namespace) -> dict:
    """Train as `args` says (see add_train_arguments); returns the run's metrics."""
    dist_ctx = setup_distributed(args.device, args.local_rank)
    try:
        return _train(args, dist_ctx)
    finally:
        if dist_ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, dist_ctx: Dist) -> dict:
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_procs))
    out = args.out or os.path.join("out", "train", args.model)
    checkpoint_path = os.path.join(out, CHECKPOINT_NAME)
    # Every rank checks, so that a refusal never leaves the other ranks waiting in a collective.
    if not args.resume and os.path.exists(checkpoint_path):
        raise ValueError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it or choose another --out")
    if dist_ctx.is_main:
        os.makedirs(out, exist_ok=True)

    run = TrainingRun(args, dist_ctx)
    if args.resume:
        run.restore(checkpoint_path)
    if dist_ctx.is_main:
        _write_epoch_files(out, run.history)
        _announce(run)

    interrupted = False
    for epoch in range(run.epochs_done, args.epochs):
        if args.max_steps is not None and run.step >= args.max_steps:
            interrupted = True
            break
        started = time.perf_counter()
        interrupted = run.train_epoch(epoch, show=dist_ctx.is_main and args.progress)
        if interrupted:
            run.elapsed += time.perf_counter() - started
            run.save(checkpoint_path)
            break
        record = run.end_epoch(epoch, started)
        if dist_ctx.is_main:
            _write_epoch_files(out, run.history)
            print(
                f"epoch {run.epochs_done}/{args.epochs} loss {record['loss']:.4f} train acc {record['train_acc']} "
                f"test acc {record['test_acc']}" + (f" ema {record['test_acc_ema']}" if run.ema is not None else "")
                + f" lr {record['lr']:.2e} {record['epoch_time_s']:.0f}s ({record['train_images_per_s']:.0f} images/s)",
                flush=True,
            )
        run.save(checkpoint_path)

    metrics = _metrics(run.history, run.step, not interrupted, run.elapsed)
    if interrupted and dist_ctx.is_main:
        print(f"stopped after {run.step} steps (--max-steps); continue with --resume", flush=True)
    if not interrupted:
        _save_final_weights(run, out, metrics)
    if dist_ctx.distributed:
        dist.barrier()
    metrics["out"] = out
    return metrics


def _announce(run: TrainingRun) -> None:
    config, model = run.config, run.model
    grids = f", grids {config.grids}" if family_of(config).cascade else ""
    print(
        f"training {config.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, "
        f"{config.num_exits} exit(s){grids}) on {run.recipe['dataset']['train_samples']} samples, "
        f"{run.dist.world_size} process(es) on {run.device}, {run.steps_per_epoch} steps/epoch x {run.args.epochs} epochs",
        flush=True,
    )
    if run.init_report is not None and not run.args.resume:
        print(run.init_report.summary(run.args.init_weights), flush=True)
    if run.frozen:
        print(f"frozen: the first {run.args.freeze_stages} stage(s), {len(run.frozen)} tensors", flush=True)


def _save_final_weights(run: TrainingRun, out: str, metrics: dict) -> None:
    if run.dist.is_main:
        _save_weights(os.path.join(out, FINAL_NAME), run.model, run.config, run.recipe, metrics)
        if run.ema is not None:
            _save_weights(os.path.join(out, FINAL_EMA_NAME), run.ema.module, run.config, run.recipe, metrics)
        print(f"wrote {os.path.join(out, FINAL_NAME)}", flush=True)
    elif run.args.dump_rank_weights:
        path = os.path.join(out, f"final.rank{run.dist.rank}.safetensors")
        _save_weights(path, run.model, run.config, run.recipe, metrics)


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
