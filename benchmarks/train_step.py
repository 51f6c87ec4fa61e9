"""Where a training step of a DVT goes, on CPU: per part, per op, images/s per core; bf16; DDP.

One step = draw a batch of Fashion-MNIST and augment it (dvt_torch.data), forward every exit,
the multi-exit loss, backward, AdamW, all as `dvt train` sets them up (dvt_torch.train.TrainingRun).
Printed, each side by side with --before REV (the model's layers as they were at git revision REV,
everything else as now) when given:
- per part, forward + backward in ms per step: each part is replayed alone on the inputs it
  received in a real step (captured by hooks); "rest" is the step minus the parts (autograd
  bookkeeping, glue ops, Python); indented rows are inside the row above;
- the top ops of torch.profiler over the step, in ms per step;
- the whole step and images/s per core (one torch thread);
- with --amp-table: a step in float32 against bf16 autocast;
- with --ddp-table: `dvt train`'s data-parallel run under torchrun, 1 process x 1 thread,
  1 x 2 threads, 2 processes x 1 thread.

Times are process CPU time (what the step costs a core, robust on a CPU shared with other jobs),
the minimum over --repeats; the step is also given in wall time. The DDP table gives wall-time
throughput (meaningful only on a quiet machine) and images per CPU-second of one process.

    .venv/bin/python benchmarks/train_step.py [--before 786631e] [--amp-table] [--ddp-table]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from common import best_time, print_table  # (common also silences MindSpore's C++ logs)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The files that hold the model's math; --before takes these from the older revision.
MODEL_FILES = ("dvt_torch/layers.py", "dvt_torch/dvt.py")


def step_time(fn, repeats: int, wall: bool = False) -> float:
    """Best CPU time of `fn` in this process (all its threads), or its wall time."""
    return best_time(fn, repeats, clock=time.perf_counter if wall else time.process_time)


class StepRunner:
    """A TrainingRun set up as `dvt train` sets it up, with an endless supply of augmented batches."""

    def __init__(self, model_name: str, batch: int, amp: str = "none", dist_ctx=None):
        import torch

        from dvt_torch.train import Dist, TrainingRun, add_train_arguments

        args = add_train_arguments(argparse.ArgumentParser()).parse_args(
            ["--model", model_name, "--batch-size", str(batch), "--amp", amp, "--threads", "1", "--no-progress"]
        )
        dist_ctx = dist_ctx or Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        self.run = TrainingRun(args, dist_ctx)
        self.run.train_model.train()
        self.batches = itertools.chain.from_iterable(
            self.run.data.train_batches(epoch, 0, self.run.augment_generator) for epoch in itertools.count()
        )

    @property
    def model(self):
        return self.run.model

    @property
    def batch_size(self) -> int:
        return self.run.args.batch_size

    def next_batch(self):
        return next(self.batches)

    def step(self, batch=None) -> None:
        self.run.train_step(*(batch or self.next_batch()))


# ---------------------------------------------------------------- per part


def _detached(value):
    import torch

    if isinstance(value, torch.Tensor):
        leaf = value.detach().clone()
        return leaf.requires_grad_(leaf.is_floating_point())
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _backward_all(output) -> None:
    import torch

    tensors = [o for o in (output if isinstance(output, tuple) else (output,))
               if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


def part_modules(model) -> dict[str, list]:
    """Named groups of submodules whose forward + backward time the table reports."""
    groups: dict[str, list] = defaultdict(list)
    for index in range(model.num_exits):
        stage = model.stage(index)
        tag = f"exit {index}"
        stem = getattr(stage, "tokens_to_token", None) or stage.patch_embed
        groups[f"{tag} stem"].append(stem)
        for name, child in stem.named_children():
            if name.startswith("attention"):
                groups[f"{tag}   stem performers"].append(child)
        for block in stage.blocks:
            groups[f"{tag} attention"].append(block.attn)
            groups[f"{tag} MLP"].append(block.mlp)
            groups[f"{tag} layer norms"].extend((block.norm1, block.norm2))
            if block.feature_reuse:
                groups[f"{tag} feature-reuse MLP"].append(block.feature_resuse_mlp)
        if stage.relation_reuse:
            groups[f"{tag} relation-reuse convs"].append(stage.relation_reuse_conv)
        groups[f"{tag} norm + head"].extend((stage.norm, stage.head))
    return groups


def capture_inputs(modules: list, run) -> dict:
    """The positional inputs every module in `modules` receives while `run()` executes."""
    seen: dict = defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[mod].append(_detached(args))) for m in set(modules)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def replay_ms(calls: list, repeats: int) -> float:
    """Forward + backward of every (fn, args) in `calls`, in ms."""
    def run():
        for fn, args in calls:
            _backward_all(fn(*args))
    return 1e3 * step_time(run, repeats)


def resampling_calls(model, batch: int) -> dict[str, list]:
    """The reuse paths' resamplings, on inputs of the shapes a step gives them."""
    import torch

    from dvt_torch import layers

    config = model.config
    calls: dict[str, list] = defaultdict(list)
    for index in range(1, model.num_exits):
        stage, src = model.stage(index), config.grids[index - 1]
        tag = f"exit {index}"
        if stage.feature_reuse:
            # revisions before cda9db3 (--before) moved (B, C, s, s) maps with resample_grid
            if hasattr(layers, "resample_tokens"):
                resample, shape = layers.resample_tokens, (batch, src * src, config.reuse_dim)
            else:
                resample, shape = layers.resample_grid, (batch, config.reuse_dim, src, src)
            x = torch.randn(shape, requires_grad=True)
            calls[f"{tag} feature resampling"].extend([(resample, (x, stage.resample_t))] * config.depth)
        if stage.relation_reuse:
            tokens = src * src + 1
            x = torch.randn(batch, config.relation_channels, tokens, tokens, requires_grad=True)
            calls[f"{tag} relation resampling"].append((layers.resample_relations, (x, stage.resample_t)))
    return calls


def step_parts(runner: StepRunner, repeats: int) -> dict[str, float]:
    """ms per step of every part (see the module docstring), the whole step last."""
    run = runner.run
    parts = {"data + augmentation": 1e3 * step_time(runner.next_batch, repeats)}
    images, labels = runner.next_batch()
    outputs = tuple(o.detach() for o in run.forward(images))
    parts["loss (fwd + bwd)"] = 1e3 * step_time(
        lambda: run.loss(tuple(o.clone().requires_grad_() for o in outputs), labels, images).backward(), repeats
    )
    run.loss(run.forward(images), labels, images).backward()
    parts["optimizer step"] = 1e3 * step_time(run.optimizer.step, repeats)
    groups = part_modules(runner.model)
    inputs = capture_inputs([m for ms in groups.values() for m in ms], runner.step)
    for name, modules in groups.items():
        parts[name] = replay_ms([(m, args) for m in modules for args in inputs[m]], repeats)
    for name, calls in resampling_calls(runner.model, runner.batch_size).items():
        parts[name] = replay_ms(calls, repeats)
    parts["step"] = 1e3 * step_time(runner.step, repeats)
    parts["step (wall)"] = 1e3 * step_time(runner.step, repeats, wall=True)
    outer = sum(ms for name, ms in parts.items() if "   " not in name and not name.startswith("step"))
    parts["rest (autograd, glue, Python)"] = parts["step"] - outer
    return parts


def top_ops(runner: StepRunner, steps: int = 2) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


# ---------------------------------------------------------------- workers


def worker(kind: str, options: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(options.threads)
    if kind == "profile":
        runner = StepRunner(options.model, options.batch)
        return {"parts": step_parts(runner, options.repeats), "ops": top_ops(runner)}
    if kind == "amp":
        runner = StepRunner(options.model, options.batch, amp=options.amp)
        return {"step": 1e3 * step_time(runner.step, options.repeats)}
    if kind == "ddp":
        from dvt_torch.train import setup_distributed

        dist_ctx = setup_distributed("cpu")
        runner = StepRunner(options.model, options.batch, dist_ctx=dist_ctx)
        steps = lambda: [runner.step() for _ in range(options.ddp_steps)]  # noqa: E731
        wall = step_time(steps, options.repeats, wall=True)
        cpu = step_time(steps, options.repeats)  # this process's threads, spin-waits included
        images = options.batch * options.ddp_steps
        return {"images_per_s": dist_ctx.world_size * images / wall, "images_per_cpu_s": images / cpu,
                "rank": dist_ctx.rank}
    raise ValueError(kind)


def _python_path_with_model_files_from(revision: str, work: str) -> str:
    """A copy of dvt_torch whose model files are those of `revision` (the rest as now)."""
    package = os.path.join(work, "dvt_torch")
    shutil.copytree(os.path.join(REPO, "dvt_torch"), package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in MODEL_FILES:
        source = subprocess.run(["git", "-C", REPO, "show", f"{revision}:{path}"], capture_output=True, text=True,
                                check=True)
        with open(os.path.join(work, path), "w", encoding="utf-8") as handle:
            handle.write(source.stdout)
    return work


def run_worker(kind: str, options: argparse.Namespace, python_path: str | None = None, extra: list[str] = (),
               launcher: list[str] = ()) -> dict:
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [*(launcher or [sys.executable]), os.path.abspath(__file__), "--worker", kind, "--model", options.model,
           "--batch", str(options.batch), "--repeats", str(options.repeats), "--ddp-steps", str(options.ddp_steps),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvt_t2t_vit_fmnist")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-ops", type=int, default=15)
    parser.add_argument("--before", default=None, metavar="REV",
                        help=f"also time {', '.join(MODEL_FILES)} as of git revision REV")
    parser.add_argument("--amp-table", action="store_true", help="float32 against bf16 autocast")
    parser.add_argument("--ddp-table", action="store_true", help="torchrun: 1x1, 1x2 threads, 2 processes x 1 thread")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="only the tables asked for")
    parser.add_argument("--ddp-steps", type=int, default=3, help="steps per timed DDP repeat")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--amp", default="none", help=argparse.SUPPRESS)
    return parser.parse_args()


def profile_tables(options: argparse.Namespace) -> None:

    columns = {"now": run_worker("profile", options)}
    if options.before:
        with tempfile.TemporaryDirectory() as work:
            columns[f"at {options.before}"] = run_worker("profile", options,
                                                         _python_path_with_model_files_from(options.before, work))
    names = list(columns)
    header = ["part (fwd + bwd)"] + [f"ms/step {n}" for n in names] + ([f"{names[1]} / now"] if len(names) > 1 else [])
    rows = []
    for part in columns["now"]["parts"]:
        values = [columns[n]["parts"][part] for n in names]
        rows.append([part, *values, *([values[1] / values[0]] if len(values) > 1 else [])])
    per_core = [options.batch / columns[n]["parts"]["step"] * 1e3 for n in names]
    rows.append(["images/s per core (CPU time)", *per_core, *([per_core[0] / per_core[1]] if len(names) > 1 else [])])
    print()
    print_table(header, rows)
    print()
    ops = columns["now"]["ops"]
    top = sorted(ops, key=ops.get, reverse=True)[: options.top_ops]
    print_table(["op (self time, profiler)"] + [f"ms/step {n}" for n in names],
                [[op, *[columns[n]["ops"].get(op, 0.0) for n in names]] for op in top])


def amp_table(options: argparse.Namespace) -> None:

    fp32 = run_worker("amp", options)["step"]
    bf16 = run_worker("amp", options, extra=["--amp", "bf16"])["step"]
    print()
    print_table(["autocast", "ms/step", "images/s per core", "speed-up"],
                [["float32", fp32, options.batch / fp32 * 1e3, 1.0],
                 ["bf16", bf16, options.batch / bf16 * 1e3, fp32 / bf16]])


def ddp_table(options: argparse.Namespace) -> None:

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    layouts = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
    rows = []
    for label, procs, threads in layouts:
        result = run_worker("ddp", options, extra=["--threads", str(threads)],
                            launcher=[*torchrun, "--nproc_per_node", str(procs)])
        rows.append([label, procs * threads, result["images_per_s"],
                     result["images_per_s"] / rows[0][2] if rows else 1.0, result["images_per_cpu_s"]])
    print()
    print_table(["torchrun layout", "cores", "images/s (wall)", "vs 1x1", "images per CPU-second"], rows)


def main() -> None:
    options = parse_options()
    if options.worker:
        result = worker(options.worker, options)
        if result.get("rank", 0) == 0:
            print(json.dumps(result), flush=True)
        return
    print(f"{options.model}, batch {options.batch}, one torch thread unless said; CPU time, best of {options.repeats}")
    if options.profile:
        profile_tables(options)
    if options.amp_table:
        amp_table(options)
    if options.ddp_table:
        ddp_table(options)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
