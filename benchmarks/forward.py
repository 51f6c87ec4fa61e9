"""Forward throughput per exit (images/s), CPU, fp32, printed as a table.

For each config and batch size: the throughput of classifying at exit k, i.e. running
stages 0..k with reuse (what an image leaving at exit k costs), in PyTorch eager,
MindSpore PyNative and MindSpore graph mode, with MindSpore's time relative to PyTorch's
and graph compile time. Each backend is timed in its own process so thread pools do not
fight.

    .venv/bin/python benchmarks/forward.py [--configs ...] [--batches 1 32] [--backends torch]
"""
from __future__ import annotations

import argparse
import json
import time

from common import print_table, run_worker

RELEASE_CONFIGS = ("dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small")


def time_torch(name: str, batch: int, repeats: int) -> dict:
    import torch

    import dvt_torch

    torch.manual_seed(0)
    model = dvt_torch.create_model(name).eval()
    config = model.config
    x = torch.randn(batch, config.in_chans, config.img_size, config.img_size)
    per_exit = []
    with torch.inference_mode():
        for exit_index in range(model.num_exits):
            def run(stages=exit_index + 1):
                state = None
                for k in range(stages):
                    _, state = model.forward_stage(k, x, state)

            run()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            per_exit.append(batch * repeats / (time.perf_counter() - start))
    return {"images_per_s": per_exit, "threads": torch.get_num_threads()}


def time_mindspore(name: str, batch: int, repeats: int, graph: bool) -> dict:
    import mindspore as ms
    import numpy as np

    import dvt_mindspore

    if graph:
        ms.set_context(mode=ms.GRAPH_MODE)
    model = dvt_mindspore.create_model(name)
    model.set_train(False)
    config = model.config
    x = ms.Tensor(np.random.default_rng(0).standard_normal(
        (batch, config.in_chans, config.img_size, config.img_size)).astype(np.float32))
    per_exit, compile_s = [], 0.0
    for exit_index in range(model.num_exits):
        def run(stages=exit_index + 1):
            features = relations = None
            for k in range(stages):
                logits, features, relations = model.stage(k)(x, features, relations)
            logits.asnumpy()  # wait for the result

        start = time.perf_counter()
        run()  # warm-up; in graph mode it compiles the new stage
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        elapsed = time.perf_counter() - start
        per_exit.append(batch * repeats / elapsed)
        compile_s += max(0.0, first - elapsed / repeats)
    return {"images_per_s": per_exit, "compile_s": compile_s if graph else None}


WORKERS = {
    "torch": time_torch,
    "mindspore-pynative": lambda name, batch, repeats: time_mindspore(name, batch, repeats, graph=False),
    "mindspore-graph": lambda name, batch, repeats: time_mindspore(name, batch, repeats, graph=True),
}


def worker_main(args: argparse.Namespace) -> None:
    result = WORKERS[args.worker](args.config, args.batch, args.repeats)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(RELEASE_CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--backends", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default: 5 at batch 1, 1 above)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    from tqdm import tqdm

    jobs = [(n, b, be) for n in args.configs for b in args.batches for be in args.backends]
    results = {}
    for name, batch, backend in tqdm(jobs, desc="timing", unit="run"):
        repeats = args.repeats or (5 if batch == 1 else 1)
        results[name, batch, backend] = run_worker(
            __file__, backend, ["--config", name, "--batch", str(batch), "--repeats", str(repeats)])

    header = ["config", "batch", "backend"] + [f"exit {k} img/s" for k in range(3)] + [
        f"exit {k} time/torch" for k in range(3)] + ["compile s"]
    rows = []
    for (name, batch, backend), r in results.items():
        reference = results.get((name, batch, "torch"))
        ratios = ([t / v for t, v in zip(reference["images_per_s"], r["images_per_s"])] if reference
                  else [float("nan")] * 3)
        compile_s = r.get("compile_s")
        rows.append([name, batch, backend, *r["images_per_s"], *ratios, "-" if compile_s is None else compile_s])
    print_table(header, rows)


if __name__ == "__main__":
    main()
