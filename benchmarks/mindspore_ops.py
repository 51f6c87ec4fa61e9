"""Where MindSpore's stage graphs spend their time, per stage and per operator, beside PyTorch's.

Each stage's graph (as the early-exit engine compiles it, graph mode, fp32) is run `--steps`
times under `mindspore.Profiler`; the table gives milliseconds per call for each operator type
and each stage, and the stage's wall time per call next to PyTorch eager's (one thread).
`--before REV` adds a column with dvt_mindspore's model files as they were at git revision REV,
so a change to the layers is measured against what it replaced, in the same run.
Each framework, revision and stage runs in a process of its own.

    .venv/bin/python benchmarks/mindspore_ops.py [--config dvt_t2t_vit_fmnist] [--batch 64] [--before REV]
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import best_time, print_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHIPPED = REPO / "weights" / "dvt_t2t_vit_fmnist.safetensors"
# The files that hold the MindSpore model's math; --before takes these from the older revision.
MODEL_FILES = ("dvt_mindspore/layers.py", "dvt_mindspore/dvt.py")


def stage_inputs_for(config_name: str, batch: int):
    """The config, canonical weights (shipped for fmnist, else seeded) and a batch of images."""
    from dvt_shared import get_model_config

    config = get_model_config(config_name)
    rng = np.random.default_rng(0)
    if config_name == SHIPPED.stem and SHIPPED.is_file():
        from dvt_shared.datasets import load_fashion_mnist, normalise_fashion_mnist
        from dvt_shared.weight_format import load_canonical

        tensors, meta = load_canonical(SHIPPED)
        try:
            images = normalise_fashion_mnist(load_fashion_mnist(None)["test_images"][:batch])
        except (FileNotFoundError, OSError):
            images = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        return meta.config, tensors, images
    images = rng.standard_normal((batch, config.in_chans, config.img_size, config.img_size)).astype(np.float32)
    return config, None, images


def mindspore_worker(config_name: str, batch: int, stage: int, steps: int) -> dict:
    import mindspore as ms

    import dvt_mindspore
    from dvt_mindspore.engine import AllExitLogits

    ms.set_context(mode=ms.GRAPH_MODE)
    config, tensors, images = stage_inputs_for(config_name, batch)
    ms.set_seed(0)
    model = dvt_mindspore.DVT(config)
    if tensors is not None:
        model = dvt_mindspore.from_canonical(model, tensors)
    graphs = AllExitLogits(model).graphs
    state = ()
    x = ms.Tensor(images)
    for graph in graphs[:stage]:  # the reuse tensors this stage reads
        _, *state = graph(x, *state)
    graph = graphs[stage]
    run = lambda: graph(x, *state)[0].asnumpy()  # noqa: E731
    wall = best_time(run, steps)
    out = tempfile.mkdtemp(prefix="ms_profile_")
    try:
        profiler = ms.Profiler(output_path=out)
        for _ in range(steps):
            run()
        profiler.analyse()
        ops: dict[str, float] = {}
        for path in glob.glob(os.path.join(out, "**", "cpu_op_type_info_*.csv"), recursive=True):
            for row in csv.DictReader(open(path, encoding="utf-8")):
                ops[row["op_type"]] = ops.get(row["op_type"], 0.0) + float(row["total_compute_time"]) / steps
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_ms": wall * 1e3, "ops_ms": ops}


def torch_worker(config_name: str, batch: int, stage: int, steps: int) -> dict:
    import torch

    import dvt_torch

    torch.set_num_threads(1)
    config, tensors, images = stage_inputs_for(config_name, batch)
    torch.manual_seed(0)
    model = dvt_torch.DVT(config)
    if tensors is not None:
        model = dvt_torch.from_canonical(model, tensors)
    model.eval()
    x = torch.from_numpy(images)
    with torch.inference_mode():
        features = relations = None
        for k in range(stage):
            _, features, relations = model.stage(k)(x, features, relations)
        current = model.stage(stage)
        wall = best_time(lambda: current(x, features, relations), steps)
    return {"wall_ms": wall * 1e3}


def python_path_with_model_files_from(revision: str, work: Path) -> str:
    """A copy of dvt_mindspore whose model files are those of `revision` (the rest as now)."""
    shutil.copytree(REPO / "dvt_mindspore", work / "dvt_mindspore", ignore=shutil.ignore_patterns("__pycache__"))
    for path in MODEL_FILES:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{path}"],
                                capture_output=True, text=True, check=True)
        (work / path).write_text(source.stdout, encoding="utf-8")
    return str(work)


def run_worker(kind: str, args: argparse.Namespace, stage: int, python_path: str | None = None) -> dict:
    env = dict(os.environ)
    if python_path:
        env["PYTHONPATH"] = python_path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", kind, "--config", args.config, "--batch", str(args.batch),
           "--stage", str(stage), "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (stage {stage}):\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="dvt_t2t_vit_fmnist")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="operator types shown (the rest summed)")
    parser.add_argument("--before", metavar="REV", help=f"also profile {', '.join(MODEL_FILES)} as of git revision REV")
    parser.add_argument("--worker", choices=["mindspore", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = mindspore_worker if args.worker == "mindspore" else torch_worker
        print(json.dumps(worker(args.config, args.batch, args.stage, args.steps)))
        return

    from tqdm import tqdm

    from dvt_shared import get_model_config

    stages = range(get_model_config(args.config).num_exits)
    columns: dict[str, list[dict]] = {"now": [], **({f"at {args.before}": []} if args.before else {})}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"now": None}
        if args.before:
            paths[f"at {args.before}"] = python_path_with_model_files_from(args.before, Path(tmp))
        jobs = [(name, k) for name in columns for k in stages]
        for name, k in tqdm(jobs, desc="MindSpore profiles", unit="stage"):
            columns[name].append(run_worker("mindspore", args, k, paths[name]))
        torch_ms = [run_worker("torch", args, k)["wall_ms"] for k in stages]

    names = list(columns)
    print(f"{args.config}, batch {args.batch}: milliseconds per call of each stage graph (MindSpore graph mode, fp32)")
    header = ["operator"] + [f"stage {k} {n}" for k in stages for n in names]
    totals: dict[str, float] = {}
    for name in names:
        for result in columns[name]:
            for op, ms in result["ops_ms"].items():
                totals[op] = totals.get(op, 0.0) + ms
    ranked = sorted(totals, key=totals.get, reverse=True)
    shown, rest = ranked[: args.top], ranked[args.top:]
    rows = [[op, *(columns[n][k]["ops_ms"].get(op, 0.0) for k in stages for n in names)] for op in shown]
    rows.append([f"{len(rest)} other operator types",
                 *(sum(columns[n][k]["ops_ms"].get(op, 0.0) for op in rest) for k in stages for n in names)])
    rows.append(["sum of operators", *(sum(columns[n][k]["ops_ms"].values()) for k in stages for n in names)])
    rows.append(["wall time per call", *(columns[n][k]["wall_ms"] for k in stages for n in names)])
    rows.append(["PyTorch eager wall time", *(torch_ms[k] for k in stages for _ in names)])
    rows.append(["MindSpore / PyTorch", *(columns[n][k]["wall_ms"] / torch_ms[k] for k in stages for n in names)])
    print_table(header, rows)


if __name__ == "__main__":
    main()
