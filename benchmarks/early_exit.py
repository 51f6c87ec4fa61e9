"""Real early exit against running every exit, on CPU: theoretical vs practical speedup.

For each config and batch size, thresholds are set (shared exit policy, release search)
so that about 60% / 25% / 15% of the images leave at exits 0 / 1 / 2. Then, side by side:
- theoretical speedup = multiply-adds of every exit on every image / multiply-adds spent;
- practical speedup = wall time of every exit on every image / wall time of the engine, both
  through the same compiled stages (every exit = the engine with thresholds nobody meets);
- efficiency = practical / theoretical;
and the engine's throughput on PyTorch eager, ONNX Runtime and MindSpore graph mode, each
timed in its own process, with ratios to PyTorch eager.

    .venv/bin/python benchmarks/early_exit.py [--configs ...] [--batches 1 64] [--backends ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import print_table, run_worker

SHARES = (0.60, 0.25, 0.15)
WEIGHTS_FILE = "weights.safetensors"


def images_for(config, count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, config.in_chans, config.img_size, config.img_size)).astype(np.float32)


def prepare(name: str, work: Path, count: int) -> dict:
    """Seeded weights (or the shipped ones), ONNX graphs and thresholds for the shares."""
    import torch

    import dvt_torch
    from dvt_shared import find_thresholds, softmax
    from dvt_shared.flops import cumulative_flops
    from dvt_shared.weight_format import WeightMetadata, save_canonical
    from dvt_torch.convert import to_canonical
    from dvt_torch.export import export_onnx

    torch.manual_seed(0)
    model = dvt_torch.create_model(name).eval()
    # random weights give near-constant confidences; widen them so that images differ
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.requires_grad:
                p.normal_(0, 1.5 / np.sqrt(p[0].numel()))
    save_canonical(work / WEIGHTS_FILE, to_canonical(model), WeightMetadata(config=model.config, provenance="benchmark"))
    export_onnx(model, work / "onnx")
    with torch.inference_mode():
        logits = np.stack([o.numpy() for o in model.forward_exits(torch.from_numpy(images_for(model.config, count)))])
    thresholds = find_thresholds(softmax(logits), np.asarray(SHARES, dtype=np.float32))
    return {"thresholds": thresholds.tolist(), "cumulative_macs": list(cumulative_flops(model.config))}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and graph compilation)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    return [images[i:i + batch] for i in range(0, len(images), batch)]


def never_stopping(thresholds) -> list[float]:
    """Thresholds no image meets before the last exit: the engine then runs every stage on every image."""
    return [1e8] * (len(thresholds) - 1) + [-1e8]


def compare(make_engine, thresholds, chunks: list, repeats: int) -> dict:
    """Wall time of every exit on every image against the engine, both through the same stage graphs."""
    every_exit, engine = make_engine(never_stopping(thresholds)), make_engine(thresholds)
    macs = []
    all_exit = timed(lambda: [every_exit.predict(x) for x in chunks], repeats)
    adaptive = timed(lambda: macs.append(sum(int(engine.predict(x).macs.sum()) for x in chunks)), repeats)
    return {"all_exit_s": all_exit, "engine_s": adaptive, "macs": macs[-1]}


def bench_torch(work: Path, thresholds, batch: int, count: int, repeats: int, max_batch: int) -> dict:
    import torch

    import dvt_torch
    from dvt_shared.weight_format import load_canonical
    from dvt_torch.convert import from_canonical
    from dvt_torch.engine import AdaptiveDVT

    tensors, meta = load_canonical(work / WEIGHTS_FILE)
    model = from_canonical(dvt_torch.DVT(meta.config), tensors).eval()
    chunks = [torch.from_numpy(b) for b in batches(images_for(meta.config, count), batch)]
    with torch.inference_mode():
        return compare(lambda t: AdaptiveDVT(model, t, max_batch), thresholds, chunks, repeats)


def bench_onnx(work: Path, thresholds, batch: int, count: int, repeats: int, max_batch: int) -> dict:
    from dvt_onnx import OnnxAdaptiveDVT

    make = lambda t: OnnxAdaptiveDVT(work / "onnx", t, max_batch=max_batch)  # noqa: E731
    chunks = batches(images_for(make(thresholds).config, count), batch)
    return compare(make, thresholds, chunks, repeats)


def bench_mindspore(work: Path, thresholds, batch: int, count: int, repeats: int, max_batch: int) -> dict:
    import mindspore as ms

    import dvt_mindspore
    from dvt_mindspore.convert import from_canonical
    from dvt_mindspore.engine import AdaptiveDVT
    from dvt_shared.weight_format import load_canonical

    ms.set_context(mode=ms.GRAPH_MODE)
    tensors, meta = load_canonical(work / WEIGHTS_FILE)
    model = from_canonical(dvt_mindspore.DVT(meta.config), tensors)
    chunks = [ms.Tensor(b) for b in batches(images_for(meta.config, count), batch)]
    start = time.perf_counter()
    AdaptiveDVT(model, never_stopping(thresholds), max_batch).predict(chunks[0])
    compile_s = time.perf_counter() - start
    result = compare(lambda t: AdaptiveDVT(model, t, max_batch), thresholds, chunks, repeats)
    return {**result, "compile_s": compile_s}


WORKERS = {"torch": bench_torch, "onnxruntime": bench_onnx, "mindspore-graph": bench_mindspore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["dvt_t2t_vit_12", "dvt_t2t_vit_fmnist"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--backends", nargs="+", default=list(WORKERS), choices=list(WORKERS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mindspore-max-batch", type=int, default=16,
                        help="MindSpore's engine runs bigger batches in chunks of this size: its CPU graphs "
                             "hold about 0.4 GB per 224x224 image, so 64 at once exceed 24 GB (default 16)")
    parser.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=[*WORKERS, "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--thresholds", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "prepare":
        print(json.dumps(prepare(args.config, Path(args.work), args.count)))
        return
    if args.worker:
        result = WORKERS[args.worker](
            Path(args.work), json.loads(args.thresholds), args.batch, args.count, args.repeats, args.max_batch
        )
        print(json.dumps(result))
        return

    from tqdm import tqdm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(name, batch) for name in args.configs for batch in args.batches]
        for name, batch in tqdm(jobs, desc="configs x batches", unit="case"):
            work = Path(tmp) / name
            work.mkdir(exist_ok=True)
            count = 32 if batch == 1 else 2 * batch
            prepared = run_worker(__file__, "prepare", ["--config", name, "--work", str(work), "--count", str(count)])
            full_macs = prepared["cumulative_macs"][-1] * count
            common = ["--work", str(work), "--batch", str(batch), "--count", str(count),
                      "--thresholds", json.dumps(prepared["thresholds"]), "--repeats", str(args.repeats)]
            chunk = {b: min(batch, args.mindspore_max_batch) if b == "mindspore-graph" else batch for b in args.backends}
            results = {b: run_worker(__file__, b, [*common, "--max-batch", str(chunk[b])]) for b in args.backends}
            torch_engine = results.get("torch", {}).get("engine_s")
            for backend, r in results.items():
                theoretical = full_macs / r["macs"]
                practical = r["all_exit_s"] / r["engine_s"]
                rows.append([name, batch, chunk[backend], backend, theoretical, practical, practical / theoretical,
                             count / r["engine_s"], (r["engine_s"] / torch_engine) if torch_engine else float("nan"),
                             r.get("compile_s", float("nan"))])
    print_table(["config", "batch", "chunk", "backend", "theoretical", "practical", "efficiency", "engine img/s",
                 "time / torch", "compile s"], rows)


if __name__ == "__main__":
    main()
