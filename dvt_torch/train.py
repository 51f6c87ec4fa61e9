"""Training of DVT cascades (and their static baselines) and of the VT classifiers (VT-ResNet
and its plain ResNet) on Fashion-MNIST, an image folder or synthetic images.

    python -m dvt_torch.train --model dvt_t2t_vit_fmnist --epochs 30 --out runs/dvt_fmnist
    python -m dvt_torch.train --model vt_resnet_fmnist --epochs 6 --out runs/vt_fmnist
    torchrun --nproc_per_node 8 -m dvt_torch.train --config release_t2t_vit_12 --data /path/to/imagenet

The loss is the release's: the (optionally weighted) sum of the per-exit cross-entropies; a
VT model or ResNet has one exit, so its loss is the plain cross-entropy.
Every epoch ends with a test evaluation of every exit and the run's files (train_outputs) and
checkpoint OUT/last.pt (train_state), which holds every random state, so --resume continues an
interrupted run to bit-identical weights on CPU, even from mid-epoch (--max-steps).

--batch-size is per process. Under torchrun (or torch.distributed.launch) every rank draws the
same permutation per epoch and trains on its own shard; only rank 0 writes files and shows progress.
This module sets a run up and runs its loop; its data is in `data`, its saved state in
`train_state`, its files in `train_outputs`.
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

from dvt_shared.data_config import apply_data_config, image_size
from dvt_shared.models import ModelConfig, family_of, get_model_config
from dvt_shared.train_options import MODEL_DEFAULT, add_train_arguments, parse_train_args, resolve_defaults

from .data import TrainingData, training_data_config
from .dvt import multi_exit_loss
from .finetune import InitWeights, freeze_stages, head_lr_groups, load_init_weights, read_init_weights, recorded_config
from .models import build_model
from .train_outputs import (
    BEST_NAME,
    FINAL_EMA_NAME,
    FINAL_NAME,
    best_so_far,
    run_metrics,
    save_weights,
    write_epoch_files,
)
from .train_state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    check_resumable,
    load_checkpoint,
    new_sums,
    rank_state,
    restore_rank_state,
    run_recipe,
    save_checkpoint,
)
from .vt import exit_logits

# by dvt_shared.train_options.AMP_CHOICES
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Class token and positions are not weights to shrink (as in the DeiT/T2T recipes).
NO_WEIGHT_DECAY = ("*.cls_token", "*.pos_embed")
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
            flags = {
                word for line in handle if line.startswith(("flags", "Features"))
                for word in line.split(":", 1)[1].split()
            }
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


def _input_overrides(args) -> dict:
    """The config fields --input-size C H W and --img-size N set."""
    overrides = {}
    if args.input_size is not None:
        channels, height, width = args.input_size
        if height != width or min(args.input_size) < 1:
            raise ValueError(f"--input-size {channels} {height} {width}: the models take square images (H = W >= 1)")
        overrides.update(in_chans=channels, img_size=height)
    if args.img_size is not None:
        if overrides.get("img_size", args.img_size) != args.img_size:
            raise ValueError(f"--img-size {args.img_size} disagrees with --input-size {args.input_size}")
        overrides["img_size"] = args.img_size
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
    for name, value in _input_overrides(args).items():
        if overrides.get(name, value) != value:
            raise ValueError(f"--model-overrides sets {name} {overrides[name]}, the input size options {value}")
        overrides[name] = value
    if args.drop_path is not None:
        if "drop_path_rate" not in config.to_dict():
            raise ValueError(f"--drop-path: {config.name} has no stochastic depth (no drop_path_rate in its config)")
        overrides.setdefault("drop_path_rate", args.drop_path)
    fields = config.to_dict()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} in --model-overrides; known fields: {sorted(fields)}")
    try:
        return config.replace(**overrides)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"--model-overrides does not describe a valid config ({exc})") from exc


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
def evaluate(
    model: torch.nn.Module, batches, device: torch.device, num_exits: int, autocast, dist_ctx: Dist,
) -> list[float]:
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

    def __init__(self, args: argparse.Namespace, dist_ctx: Dist, read_checkpoint=None):
        from timm.data import Mixup
        from timm.optim import create_optimizer_v2, param_groups_weight_decay
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.args, self.dist = args, dist_ctx
        device = self.device = dist_ctx.device
        self.amp_dtype = _amp_dtype(args.amp, device)
        self.data = TrainingData(args, dist_ctx.rank, dist_ctx.world_size, pin_memory=device.type == "cuda")
        init = read_init_weights(args.init_weights, read_checkpoint) if args.init_weights else None
        config = self.config = _build_config(args, num_classes=len(self.data.classes), init=init)
        if family_of(config).task != "classification":
            raise ValueError(
                f"{config.name} is a segmentation model; this project has no segmentation data to train it on"
            )
        self.notes = resolve_defaults(args, self.data.kind, self.data.train_size, max(image_size(config)),
                                      dist_ctx.world_size, fine_tuning=init is not None)
        self.data_config = training_data_config(args, config, self.data, init.data_config if init else None)
        self.data.set_model_input(config, self.data_config)
        if args.grad_accum < 1 or args.batch_size % args.grad_accum:
            raise ValueError(
                f"--grad-accum {args.grad_accum} must be a positive divisor of --batch-size {args.batch_size}"
            )
        self.exit_weights = tuple(args.exit_weights) if args.exit_weights else (1.0,) * config.num_exits
        if len(self.exit_weights) != config.num_exits:
            raise ValueError(
                f"--exit-weights has {len(self.exit_weights)} values but {config.name} has {config.num_exits} exits"
            )
        self.teacher = load_teacher(args.teacher, config, device) if args.teacher else None
        self.recipe = run_recipe(args, dist_ctx.world_size, self.data.describe(), config.name)

        # The same seed on every rank gives every rank the same initial weights.
        torch.manual_seed(args.seed)
        self.model = build_model(config)
        # its pretrained_cfg says how it reads images and names its classes, for timm's resolve_data_config
        apply_data_config(self.model, self.data_config)
        self.init_report = None
        if init is not None:
            # heads trained on other classes start afresh; on the same classes (by name) they carry on
            same_classes = init.data_config is not None and init.data_config.class_names == self.data_config.class_names
            self.init_report = load_init_weights(self.model, init, keep_heads=same_classes)
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
        # the cosine's epochs, then the cooldown's at min_lr
        self.scheduler, self.total_epochs = create_scheduler_v2(
            self.optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay) if args.ema else None
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob, label_smoothing=args.label_smoothing,
                num_classes=config.num_classes,
            )
        # Mixup already smooths its soft targets; smoothing them again in the loss would double it.
        self.loss_smoothing = 0.0 if self.mixup is not None else args.label_smoothing

        # Ranks differ in dropout, augmentation and mixing draws, and each state is checkpointed.
        torch.manual_seed(args.seed + 7_919 * dist_ctx.rank)
        np.random.seed((args.seed + 7_919 * dist_ctx.rank) % 2**32)
        self.augment_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 104_729 * (dist_ctx.rank + 1))

        self.step, self.epochs_done, self.elapsed = 0, 0, 0.0
        self.sums = new_sums(config.num_exits, device)
        self.history: list[dict] = []
        self.train_model = self.model
        if dist_ctx.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if args.compile:
            # the whole training forward, DistributedDataParallel included (its buckets then overlap the backward)
            self.train_model = torch.compile(self.train_model, backend=args.compile_backend)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------ state

    def save(self, path: str) -> None:
        """Write everything a resume needs (every rank's random states included; rank 0 writes)."""
        ranks = [None] * self.dist.world_size
        mine = rank_state(self.augment_generator, self.device, self.sums)
        if self.dist.distributed:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.dist.is_main:
            save_checkpoint(path, {
                "format": CHECKPOINT_FORMAT, "recipe": json.dumps(self.recipe),
                "config": json.dumps(self.config.to_dict()),
                "epoch": self.epochs_done, "step": self.step, "elapsed": self.elapsed,
                "history": json.dumps(self.history),
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
        check_resumable(saved, self.recipe, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved_length = (saved["args"]["epochs"], saved["args"].get("cooldown_epochs", 0))
        if saved_length == (self.args.epochs, self.args.cooldown_epochs):
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
        self.sums = restore_rank_state(state["ranks"][self.dist.rank], self.augment_generator, self.device)
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
            total=self.steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{self.total_epochs}",
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
            "test_acc": evaluate(
                self.train_model, self.data.test_batches(), self.device, num_exits, self.autocast, self.dist
            ),
        }
        if self.ema is not None:
            record["test_acc_ema"] = evaluate(
                self.ema.module, self.data.test_batches(), self.device, num_exits, self.autocast, self.dist
            )
        epoch_time = time.perf_counter() - started
        self.elapsed += epoch_time
        # training images per second over every rank (the epoch's training part; after a mid-epoch resume
        # the images before the interruption count too)
        record.update(lr=self.optimizer.param_groups[0]["lr"], epoch_time_s=round(epoch_time, 2),
                      elapsed_s=round(self.elapsed, 2), train_images_per_s=round(int(seen) / train_time, 1))
        self.history.append(record)
        self.epochs_done = epoch + 1
        self.sums = new_sums(num_exits, self.device)
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


def train(args: argparse.Namespace, read_checkpoint=None) -> dict:
    """Train as `args` says (see add_train_arguments); returns the run's metrics. `read_checkpoint(path)` reads
    --init-weights of another backend's format (`dvt train` passes the backend table's readers)."""
    dist_ctx = setup_distributed(args.device, args.local_rank)
    try:
        return _train(args, dist_ctx, read_checkpoint)
    finally:
        if dist_ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, dist_ctx: Dist, read_checkpoint=None) -> dict:
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_procs))
    out = args.out or os.path.join("out", "train", args.model)
    checkpoint_path = os.path.join(out, CHECKPOINT_NAME)
    # Every rank checks, so that a refusal never leaves the other ranks waiting in a collective.
    if not args.resume and os.path.exists(checkpoint_path):
        raise ValueError(
            f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it or choose another --out"
        )
    if dist_ctx.is_main:
        os.makedirs(out, exist_ok=True)

    run = TrainingRun(args, dist_ctx, read_checkpoint)
    if args.resume:
        run.restore(checkpoint_path)
    if dist_ctx.is_main:
        write_epoch_files(out, run.history)
        _announce(run)

    interrupted = False
    for epoch in range(run.epochs_done, run.total_epochs):
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
            write_epoch_files(out, run.history)
            save_best(run, out, record)
            print(
                f"epoch {run.epochs_done}/{run.total_epochs} loss {record['loss']:.4f} train acc {record['train_acc']} "
                f"test acc {record['test_acc']}" + (f" ema {record['test_acc_ema']}" if run.ema is not None else "")
                + f" lr {record['lr']:.2e} {record['epoch_time_s']:.0f}s ({record['train_images_per_s']:.0f} images/s)",
                flush=True,
            )
        run.save(checkpoint_path)

    metrics = run_metrics(run.history, run.step, not interrupted, run.elapsed)
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
        f"{run.dist.world_size} process(es) on {run.device}, "
        f"{run.steps_per_epoch} steps/epoch x {run.total_epochs} epochs",
        flush=True,
    )
    for note in run.notes:
        print(note, flush=True)
    if run.init_report is not None and not run.args.resume:
        print(run.init_report.summary(run.args.init_weights), flush=True)
    if run.frozen:
        print(f"frozen: the first {run.args.freeze_stages} stage(s), {len(run.frozen)} tensors", flush=True)


def save_best(run: TrainingRun, out: str, record: dict) -> None:
    """Write OUT/best.safetensors when this epoch's weights (raw or EMA) beat every earlier epoch's last exit."""
    _, source, epoch = best_so_far(run.history)
    if epoch != record["epoch"]:
        return
    model = run.ema.module if source == "ema" else run.model
    metrics = run_metrics(run.history, run.step, False, run.elapsed)
    save_weights(os.path.join(out, BEST_NAME), model, run.config, run.recipe, metrics, run.data_config)


def _save_final_weights(run: TrainingRun, out: str, metrics: dict) -> None:
    if run.dist.is_main:
        save_weights(os.path.join(out, FINAL_NAME), run.model, run.config, run.recipe, metrics, run.data_config)
        if run.ema is not None:
            save_weights(os.path.join(out, FINAL_EMA_NAME), run.ema.module, run.config, run.recipe, metrics,
                         run.data_config)
        print(f"wrote {os.path.join(out, FINAL_NAME)}", flush=True)
    elif run.args.dump_rank_weights:
        path = os.path.join(out, f"final.rank{run.dist.rank}.safetensors")
        save_weights(path, run.model, run.config, run.recipe, metrics, run.data_config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dvt_torch.train", allow_abbrev=False,
        description="Train a DVT cascade or a VT classifier (see the module docstring).",
    )
    add_train_arguments(parser)
    try:
        args = parse_train_args(parser, sys.argv[1:] if argv is None else list(argv))
        metrics = train(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
