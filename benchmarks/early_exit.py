"""Real early exit against running every exit, on CPU: theoretical vs practical speedup.

For each config and batch size, thresholds are set (shared exit policy, release search)
so that about 60% / 25% / 15% of the images leave at exits 0 / 1 / 2. Then, side by side:
- theoretical speedup = multiply-adds of every exit on every image / multiply-adds spent;
- practical speedup = wall time of every exit on every image / wall time of the engine, both
  through the same compiled stages (every exit = the engine with thresholds nobody meets);
- efficiency = practical / theoretical;
and the engine's throughput on PyTorch eager (fp32 and bf16 autocast), ONNX Runtime and
MindSpore graph mode (fp32 and fp16; fixed batch gears and the dynamic batch axis), each timed
in its own process, with ratios to PyTorch eager fp32, and MindSpore's compile time per gear.
`--profile` adds MindSpore's and PyTorch's time per stage at the full batch.

The Fashion-MNIST config uses the shipped weights and thresholds on real test images when
both are present; the others seeded random weights and noise images.

    .venv/bin/python benchmarks/early_exit.py [--configs ...] [--batches 1 64] [--backends ...] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import MINDSPORE_DEFAULT_GLOG_V, best_time, print_table, run_worker

SHARES = (0.60, 0.25, 0.15)
WEIGHTS_FILE = "weights.safetensors"
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "dvt_t2t_vit_fmnist.safetensors"


def fashion_mnist_test_images(count: int) -> np.ndarray | None:
    from dvt_shared.datasets import load_fashion_mnist, normalise_fashion_mnist

    try:
        return normalise_fashion_mnist(load_fashion_mnist(None)["test_images"][:count])
    except (FileNotFoundError, OSError):
        return None


def uses_shipped(name: str, count: int) -> bool:
    return name == "dvt_t2t_vit_fmnist" and SHIPPED.is_file() and fashion_mnist_test_images(1) is not None


def images_for(config, count: int) -> np.ndarray:
    if uses_shipped(config.name, count):
        return fashion_mnist_test_images(count)
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, config.in_chans, config.img_size, config.img_size)).astype(np.float32)


def prepare(name: str, work: Path, count: int) -> dict:
    """Seeded weights (or the shipped ones with their thresholds), ONNX graphs and thresholds for the shares."""
    import torch

    import dvt_torch
    from dvt_shared import find_thresholds, softmax
    from dvt_shared.flops import cumulative_flops
    from dvt_shared.weight_format import WeightMetadata, load_canonical, save_canonical
    from dvt_torch.convert import from_canonical, to_canonical
    from dvt_torch.export import export_onnx

    if uses_shipped(name, count):
        shutil.copyfile(SHIPPED, work / WEIGHTS_FILE)
        tensors, meta = load_canonical(SHIPPED)
        export_onnx(from_canonical(dvt_torch.DVT(meta.config), tensors).eval(), work / "onnx")
        return {"thresholds": list(meta.thresholds), "cumulative_macs": list(cumulative_flops(meta.config)),
                "weights": "shipped"}
    torch.manual_seed(0)
    model = dvt_torch.create_model(name).eval()
    # random weights give near-constant confidences; widen them so that images differ
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.requires_grad:
                p.normal_(0, 1.5 / np.sqrt(p[0].numel()))
    save_canonical(work / WEIGHTS_FILE, to_canonical(model),
                   WeightMetadata(config=model.config, provenance="benchmark"))
    export_onnx(model, work / "onnx")
    with torch.inference_mode():
        logits = np.stack([o.numpy() for o in model.forward_exits(torch.from_numpy(images_for(model.config, count)))])
    thresholds = find_thresholds(softmax(logits), np.asarray(SHARES, dtype=np.float32))
    return {"thresholds": thresholds.tolist(), "cumulative_macs": list(cumulative_flops(model.config)),
            "weights": "seeded"}


def batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    return [images[i:i + batch] for i in range(0, len(images), batch)]


def every_exit(engine):
    """`engine` with thresholds nobody meets before the last exit (restore with `engine.set_thresholds(...)`)."""
    from dvt_shared.exit_policy import last_exit_only

    engine.set_thresholds(last_exit_only(engine.config.num_exits))
    return engine


def compare(engine, chunks: list, repeats: int) -> dict:
    """Wall time of every exit on every image against real early exit, through the same engine (its stages)."""
    thresholds = engine.thresholds
    all_exit = best_time(lambda: [every_exit(engine).predict(x) for x in chunks], repeats)
    engine.set_thresholds(thresholds)
    macs = []
    adaptive = best_time(lambda: macs.append(sum(int(engine.predict(x).macs.sum()) for x in chunks)), repeats)
    return {"all_exit_s": all_exit, "engine_s": adaptive, "macs": macs[-1]}


def bench_torch(work: Path, thresholds, batch: int, count: int, repeats: int, max_batch: int,
                precision: str = "fp32", profile: bool = False) -> dict:
    import torch

    import dvt_torch
    from dvt_shared.weight_format import load_canonical
    from dvt_torch.convert import from_canonical
    from dvt_torch.engine import AdaptiveDVT

    torch.set_num_threads(1)  # a shared machine: two OpenMP threads collapse when another process holds a core
    tensors, meta = load_canonical(work / WEIGHTS_FILE)
    model = from_canonical(dvt_torch.DVT(meta.config), tensors).eval()
    chunks = [torch.from_numpy(b) for b in batches(images_for(meta.config, count), batch)]
    with torch.inference_mode():
        engine = AdaptiveDVT(model, thresholds, max_batch, precision=precision)
        result = compare(engine, chunks, repeats)
        if profile:
            result["stage_s"] = stage_times(engine, chunks[0], repeats)
    return result


def bench_onnx(work: Path, thresholds, batch: int, count: int, repeats: int, max_batch: int, **_) -> dict:
    from dvt_onnx import OnnxAdaptiveDVT

    engine = OnnxAdaptiveDVT(work / "onnx", thresholds, max_batch=max_batch)
    return compare(engine, batches(images_for(engine.config, count), batch), repeats)


def stage_times(engine, images, repeats: int) -> list[float]:
    """Best wall time of each stage on one chunk of the batch (every image runs every stage)."""
    images = images[: engine.max_batch]
    times, state = [], None
    for k in range(engine.config.num_exits):
        run = lambda k=k, state=state: engine.run_stage(k, images, state)  # noqa: E731
        _, next_state = run()
        times.append(best_time(run, repeats))
        state = next_state
    return times


def bench_mindspore(work: Path, thresholds, batch: int, count: int, repeats: int, max_batch: int,
                    precision: str = "fp32", gears: str = "powers-of-two", profile: bool = False) -> dict:
    import mindspore as ms

    import dvt_mindspore
    from dvt_mindspore.convert import from_canonical
    from dvt_mindspore.engine import AdaptiveDVT
    from dvt_shared.weight_format import load_canonical

    ms.set_context(mode=ms.GRAPH_MODE)
    tensors, meta = load_canonical(work / WEIGHTS_FILE)
    model = from_canonical(dvt_mindspore.DVT(meta.config), tensors)
    images = images_for(meta.config, count)
    chunks = [ms.Tensor(b) for b in batches(images, batch)]
    engine = AdaptiveDVT(model, thresholds, max_batch, gears=gears, precision=precision)
    compile_s = {}
    # Compile time per gear: the first pass of a batch of that size through every stage.
    every_exit(engine)
    for size in (engine.gears or (min(batch, max_batch),)):
        start = time.perf_counter()
        engine.predict(ms.Tensor(np.resize(images, (size, *images.shape[1:]))))
        compile_s[str(size) if engine.gears else "dynamic"] = time.perf_counter() - start
    engine.set_thresholds(thresholds)
    result = compare(engine, chunks, repeats)
    result["compile_s"] = compile_s
    if profile:
        result["stage_s"] = stage_times(engine, chunks[0], repeats)
    return result


# backend: (worker, its options); PyTorch fp32 is the reference every ratio is taken to.
WORKERS = {
    "torch": (bench_torch, {}),
    "torch-bf16": (bench_torch, {"precision": "bf16"}),
    "onnxruntime": (bench_onnx, {}),
    "mindspore-graph": (bench_mindspore, {}),
    "mindspore-dynamic": (bench_mindspore, {"gears": "dynamic"}),
    "mindspore-fp16": (bench_mindspore, {"precision": "fp16"}),
}
LABELS = {  # backend -> (framework, precision, shapes)
    "torch": ("PyTorch eager", "fp32", "any"), "torch-bf16": ("PyTorch eager", "bf16", "any"),
    "onnxruntime": ("ONNX Runtime", "fp32", "dynamic"), "mindspore-graph": ("MindSpore graph", "fp32", "gears"),
    "mindspore-dynamic": ("MindSpore graph", "fp32", "dynamic"), "mindspore-fp16": ("MindSpore graph", "fp16", "gears"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["dvt_t2t_vit_12", "dvt_t2t_vit_fmnist"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--backends", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--count", type=int, help="images per case (default 32 at batch 1, else twice the batch)")
    parser.add_argument("--profile", action="store_true", help="also time each stage on the full batch")
    parser.add_argument("--verbose", action="store_true", help="show MindSpore's C++ log lines")
    parser.add_argument("--mindspore-max-batch", type=int, default=16,
                        help="MindSpore's engine runs bigger batches in chunks of this size: its CPU graphs "
                             "hold about 0.4 GB per 224x224 image, so 64 at once exceed 24 GB (default 16)")
    parser.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=[*WORKERS, "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--thresholds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.verbose:
        os.environ["GLOG_v"] = MINDSPORE_DEFAULT_GLOG_V  # before any worker imports MindSpore; workers inherit it

    if args.worker == "prepare":
        print(json.dumps(prepare(args.config, Path(args.work), args.count)))
        return
    if args.worker:
        worker, options = WORKERS[args.worker]
        result = worker(Path(args.work), json.loads(args.thresholds), args.batch, args.count, args.repeats,
                        args.max_batch, profile=args.profile, **options)
        print(json.dumps(result))
        return

    from tqdm import tqdm

    rows, stage_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(name, batch) for name in args.configs for batch in args.batches]
        for name, batch in tqdm(jobs, desc="configs x batches", unit="case"):
            work = Path(tmp) / name
            work.mkdir(exist_ok=True)
            count = args.count or (32 if batch == 1 else 2 * batch)
            prepared = run_worker(__file__, "prepare", ["--config", name, "--work", str(work), "--count", str(count)])
            full_macs = prepared["cumulative_macs"][-1] * count
            common = ["--work", str(work), "--batch", str(batch), "--count", str(count),
                      "--thresholds", json.dumps(prepared["thresholds"]), "--repeats", str(args.repeats)]
            common += ["--profile"] if args.profile else []
            chunk = {b: min(batch, args.mindspore_max_batch) if b.startswith("mindspore") else batch
                     for b in args.backends}
            results = {}
            for b in args.backends:
                results[b] = run_worker(__file__, b, [*common, "--max-batch", str(chunk[b])])
            torch_engine = results.get("torch", {}).get("engine_s")
            torch_fp32_engine = torch_engine if torch_engine else float("nan")
            for backend, r in results.items():
                theoretical = full_macs / r["macs"]
                practical = r["all_exit_s"] / r["engine_s"]
                framework, precision, shapes = LABELS[backend]
                compile_s = r.get("compile_s", {})
                rows.append([f"{name} ({prepared['weights']})", batch, chunk[backend], framework, precision, shapes,
                             theoretical, practical, practical / theoretical, count / r["engine_s"],
                             r["engine_s"] / torch_fp32_engine, torch_fp32_engine / r["engine_s"],
                             " ".join(f"{g}:{s:.1f}" for g, s in compile_s.items()) or "-"])
                if "stage_s" in r:
                    stage_rows.append([name, batch, framework, precision, shapes,
                                       *(f"{t * 1e3:.1f}" for t in r["stage_s"])])
    print_table(["config (weights)", "batch", "chunk", "backend", "precision", "shapes", "theoretical", "practical",
                 "efficiency", "engine img/s", "time / torch fp32", "speed vs torch fp32", "compile s per gear"], rows)
    if stage_rows:
        print()
        print_table(["config", "batch", "backend", "precision", "shapes",
                     *(f"stage {k} ms" for k in range(len(stage_rows[0]) - 5))], stage_rows)


if __name__ == "__main__":
    main()
