"""`dvt serve` under open-loop load: the DVT against its static baseline behind the same server, and stage-level
against whole-cascade batching.

For each server configuration, `dvt serve` starts on a local Ray instance; its capacity (images/s) is measured
closed-loop, then Poisson arrivals (open loop, `tritonclient`'s asyncio HTTP client, UINT8 binary requests of
Fashion-MNIST test images) run at fractions of that capacity. Per point: throughput, p50/p95/p99 latency, the
mean batch per stage, exit shares, the server's queue wait and compute per image, and 503s. Then, for the
stage-batching DVT: an overload trial (2x capacity, then 25%: refusals, the replica's memory, the time to
full throughput again) and the decisions of >= 10,000 images sent concurrently against the offline engine
on each image alone. Writes OUT/serve_load.json and OUT/serve_load.png (latency against throughput).

    python benchmarks/serve_load.py                  # 60 s per point, the full run (about 25 minutes)
    python benchmarks/serve_load.py --seconds 10 --fractions 0.5 1.0 --mismatch-images 1000   # a quick look

Time it on a quiet machine: the load generator, Ray's proxy and the replica share its cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table  # noqa: E402

WEIGHTS = {"dvt": ROOT / "weights" / "dvt_t2t_vit_fmnist.safetensors",
           "static": ROOT / "weights" / "dvt_t2t_vit_fmnist_static.safetensors"}
# name -> (weights, extra `dvt serve` options)
CONFIGS = {
    "dvt-stage": ("dvt", ["--batching", "stage"]),
    "dvt-cascade": ("dvt", ["--batching", "cascade"]),
    "dvt-budget": ("dvt", ["--batching", "stage", "--budget", "0.00755"]),
    "static": ("static", ["--batching", "stage"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dvt serve` in a process of its own, on a local Ray instance."""

    def __init__(self, weights: Path, extra: list[str], args):
        import tritonclient.http as http

        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "dvt_cli", "serve", "--weights", str(weights), "--port", str(self.port),
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                   "--max-queue", str(args.max_queue), "--threads", str(args.threads), *extra]
        self.log = open(Path(args.out) / f"serve_{self.port}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        client = http.InferenceServerClient(self.url)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dvt serve exited; see {self.log.name}")
            try:
                if client.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("dvt serve did not become ready")
        from dvt_cli import read_weights

        self.name = read_weights(str(weights))[0].name

    def stats(self) -> dict:
        import tritonclient.http as http

        return http.InferenceServerClient(self.url).get_inference_statistics(self.name)["model_stats"][0]["dvt"]

    def replica_rss_mb(self) -> float:
        import psutil

        rss = [p.memory_info().rss for p in psutil.process_iter(["cmdline"])
               if "ServeReplica:dvt" in " ".join(p.info["cmdline"] or [])]
        return sum(rss) / 2**20

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Load:
    """Requests of `per_request` consecutive test images (UINT8, binary), cycling through the test set."""

    def __init__(self, server: Server, pixels: np.ndarray, per_request: int):
        import tritonclient.http as http
        import tritonclient.http.aio as aio

        self.http, self.server, self.pixels, self.k = http, server, pixels, per_request
        self.client = aio.InferenceServerClient(server.url, conn_limit=1000)
        self.next = 0
        self.outputs = [http.InferRequestedOutput(n, binary_data=True) for n in ("class_index", "exit", "macs")]

    def batch(self) -> tuple[int, np.ndarray]:
        start = self.next % len(self.pixels)
        self.next += self.k
        rows = np.arange(start, start + self.k) % len(self.pixels)
        return start, self.pixels[rows]

    async def one(self, record: list) -> None:
        """One request; appends (sent, done, status, exits, macs)."""
        from tritonclient.utils import InferenceServerException

        _, batch = self.batch()
        tensor = self.http.InferInput("images", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        sent = time.monotonic()
        try:
            result = await self.client.infer(self.server.name, [tensor], outputs=self.outputs)
            record.append((sent, time.monotonic(), 200, result.as_numpy("exit"), result.as_numpy("macs")))
        except InferenceServerException as exc:
            record.append((sent, time.monotonic(), int(exc.status() or 0), None, None))

    async def closed_loop(self, seconds: float, concurrency: int) -> float:
        """Images/s with `concurrency` requests always in flight."""
        record, end = [], time.monotonic() + seconds

        async def worker():
            while time.monotonic() < end:
                await self.one(record)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        answered = sum(len(r[3]) for r in record if r[2] == 200)
        return answered / (time.monotonic() - start)

    async def open_loop(self, schedule: list[tuple[float, float]], seed: int = 0) -> list:
        """Poisson arrivals: `schedule` is [(seconds, images/s)] segments; returns every request's record."""
        rng, record, tasks = np.random.default_rng(seed), [], []
        start = time.monotonic()
        at = start
        for seconds, rate in schedule:
            segment_end = at + seconds
            while True:
                at += rng.exponential(self.k / rate)
                if at >= segment_end:
                    at = segment_end
                    break
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(self.one(record)))
        await asyncio.gather(*tasks)
        return record

    async def close(self) -> None:
        await self.client.close()


def summarise(record: list, seconds: float) -> dict:
    ok = [r for r in record if r[2] == 200]
    latency = np.array([r[1] - r[0] for r in ok]) * 1e3
    exits = np.concatenate([r[3] for r in ok]) if ok else np.zeros(0, int)
    macs = np.concatenate([r[4] for r in ok]) if ok else np.zeros(0, int)
    refused = sum(1 for r in record if r[2] == 503)
    return {
        "requests": len(record), "answered": len(ok), "refused_503": refused,
        "other_errors": sum(1 for r in record if r[2] not in (200, 503)),
        "images_per_s": len(exits) / seconds,
        "p50_ms": float(np.percentile(latency, 50)) if ok else None,
        "p95_ms": float(np.percentile(latency, 95)) if ok else None,
        "p99_ms": float(np.percentile(latency, 99)) if ok else None,
        "exit_shares": (np.bincount(exits, minlength=3) / max(len(exits), 1)).round(4).tolist(),
        "mean_macs": float(macs.mean()) if len(macs) else None,
    }


def stats_delta(before: dict, after: dict) -> dict:
    batches = np.subtract(after["stage_batches"], before["stage_batches"])
    images = np.subtract(after["stage_images"], before["stage_images"])
    waits = np.subtract(np.multiply(after["mean_wait_ms"], after["stage_images"]),
                        np.multiply(before["mean_wait_ms"], before["stage_images"]))
    runs = np.subtract(np.multiply(after["mean_run_ms"], after["stage_batches"]),
                       np.multiply(before["mean_run_ms"], before["stage_batches"]))
    answered = max(int(sum(np.subtract(after["exits"], before["exits"]))), 1)
    return {"mean_batch": np.round(images / np.maximum(batches, 1), 2).tolist(),
            # per answered image: queue wait summed over the stages it ran, and compute of its batches shared out
            "wait_ms_per_image": float(waits.sum() / answered),
            "run_ms_per_image": float(runs.sum() / answered)}


async def sweep(name: str, args, pixels: np.ndarray) -> dict:
    weights, extra = CONFIGS[name]
    server = Server(WEIGHTS[weights], extra, args)
    result = {"config": name, "points": []}
    try:
        load = Load(server, pixels, args.images_per_request)
        await load.closed_loop(3, args.concurrency)  # warm-up
        capacity = await load.closed_loop(args.capacity_seconds, args.concurrency)
        result["capacity_images_per_s"] = capacity
        print(f"{name}: capacity {capacity:.0f} images/s", flush=True)
        for fraction in args.fractions:
            before = server.stats()
            record = await load.open_loop([(args.seconds, fraction * capacity)], seed=int(fraction * 100))
            point = {"fraction": fraction, "offered_images_per_s": fraction * capacity,
                     **summarise(record, args.seconds), **stats_delta(before, server.stats())}
            result["points"].append(point)
            print(f"  {fraction:.2f}: {point['images_per_s']:.0f} images/s, p99 {point['p99_ms']:.1f} ms, "
                  f"503s {point['refused_503']}, batches {point['mean_batch']}", flush=True)
        if args.single_image_point:
            one = Load(server, pixels, 1)
            before = server.stats()
            record = await one.open_loop([(args.seconds / 2, 0.25 * capacity)], seed=7)
            result["one_image_requests"] = {"offered_images_per_s": 0.25 * capacity,
                                            **summarise(record, args.seconds / 2), **stats_delta(before,
                                                                                                 server.stats())}
            await one.close()
        if name == "dvt-stage" and args.overload_seconds:
            result["overload"] = await overload(server, load, capacity, args)
        if name == "dvt-stage" and args.mismatch_images:
            result["mismatch"] = await mismatches(server, pixels[: args.mismatch_images], args)
        await load.close()
    finally:
        server.stop()
    return result


async def overload(server: Server, load: Load, capacity: float, args) -> dict:
    """2x capacity for overload_seconds, then 25% for 20 s: refusals, replica memory, and the seconds until every
    second's requests are answered again at the p99 of the quiet phase."""
    rss = [server.replica_rss_mb()]
    stop = asyncio.Event()

    async def watch():
        while not stop.is_set():
            rss.append(server.replica_rss_mb())
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(watch())
    record = await load.open_loop([(args.overload_seconds, 2 * capacity), (20, 0.25 * capacity)], seed=11)
    stop.set()
    await watcher
    start = min(r[0] for r in record)
    drop = start + args.overload_seconds
    high = [r for r in record if r[0] < drop]
    low = [r for r in record if r[0] >= drop]
    quiet_p99 = np.percentile([r[1] - r[0] for r in low[len(low) // 2:] if r[2] == 200], 99)
    # recovered: from this second on, no request is refused and none takes longer than 2x the quiet p99
    seconds = np.floor(np.array([r[0] - drop for r in low])).astype(int)
    bad = {s for s, r in zip(seconds, low) if r[2] != 200 or r[1] - r[0] > 2 * quiet_p99}
    recovered = max(bad) + 1 if bad else 0
    return {"offered_high": 2 * capacity, "high": summarise(high, args.overload_seconds),
            "low": summarise(low, 20), "rss_mb_before": rss[0], "rss_mb_max": max(rss),
            "recovered_after_s": int(recovered), "quiet_p99_ms": float(quiet_p99 * 1e3)}


async def mismatches(server: Server, pixels: np.ndarray, args) -> dict:
    """Every image once, requests of images_per_request with `concurrency` in flight; decisions against the
    offline engine on each image alone."""
    import tritonclient.http as http
    import tritonclient.http.aio as aio

    client = aio.InferenceServerClient(server.url, conn_limit=1000)
    outputs = [http.InferRequestedOutput(n, binary_data=True) for n in ("class_index", "exit")]
    k, semaphore = args.images_per_request, asyncio.Semaphore(args.concurrency)

    async def one(start):
        async with semaphore:
            tensor = http.InferInput("images", [min(k, len(pixels) - start), 28, 28], "UINT8")
            tensor.set_data_from_numpy(pixels[start:start + k])
            result = await client.infer(server.name, [tensor], outputs=outputs)
            return result.as_numpy("class_index"), result.as_numpy("exit")

    answers = await asyncio.gather(*(one(s) for s in range(0, len(pixels), k)))
    await client.close()
    classes = np.concatenate([a[0] for a in answers])
    exits = np.concatenate([a[1] for a in answers])
    return {"images": len(pixels), "classes": classes.tolist(), "exits": exits.tolist()}


def offline_decisions(pixels: np.ndarray, mismatch: dict) -> dict:
    """Compare the served decisions with the offline engine's on each image alone (after the servers stopped)."""
    import torch

    from dvt_cli import backends, read_weights
    from dvt_shared.error_bounds import FP32, decision_agreement
    from dvt_shared.exit_policy import MAX_SOFTMAX, softmax
    from dvt_shared.transforms import normalise_pixels

    torch.set_num_threads(1)
    config, tensors, metadata, _ = read_weights(str(WEIGHTS["dvt"]))
    engine = backends.engine("torch", config, tensors, metadata.thresholds)
    images = normalise_pixels(pixels[:, None], metadata.data_config)
    alone = [engine.predict(images[i:i + 1]) for i in range(len(images))]
    alone_exit = np.array([p.exit_index[0] for p in alone])
    alone_class = np.array([p.classes[0] for p in alone])
    served_exit, served_class = np.array(mismatch["exits"]), np.array(mismatch["classes"])
    all_exit = engine.all_exit_logits(images)
    margins = MAX_SOFTMAX.margin(FP32.exit_bounds(config.depth, all_exit))
    agreement = decision_agreement(softmax(all_exit).max(-1), served_exit, engine.thresholds, margins)
    return {"images": len(images), "exit_differs": int((served_exit != alone_exit).sum()),
            "class_differs": int((served_class != alone_class).sum()),
            "borderline": agreement.borderline, "unexplained": int(agreement.unexplained.size)}


def at_equal_p99(results: list[dict], slos_ms: list[float]) -> list[list]:
    """Per p99 bound: the most images/s each configuration sustained within it."""
    rows = []
    for slo in slos_ms:
        best = {r["config"]: max([p["images_per_s"] for p in r["points"] if p["p99_ms"] and p["p99_ms"] <= slo
                                  and p["refused_503"] == 0], default=0.0) for r in results}
        ratio = best.get("dvt-stage", 0) / best["static"] if best.get("static") else float("nan")
        rows.append([slo, *[best[r["config"]] for r in results], ratio])
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        points = [p for p in r["points"] if p["p99_ms"]]
        x = [p["images_per_s"] for p in points]
        ax.plot(x, [p["p99_ms"] for p in points], "o-", label=f"{r['config']} p99")
        ax.plot(x, [p["p50_ms"] for p in points], "x--", alpha=0.6, label=f"{r['config']} p50")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("dvt serve, open-loop Poisson load, 1 replica")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per load point (default 60)")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0, 1.2])
    parser.add_argument("--images-per-request", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight for the capacity")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--mismatch-images", type=int, default=10000)
    parser.add_argument("--single-image-point", action=argparse.BooleanOptionalAction, default=True,
                        help="also run one-image requests at 25%% of capacity (where the time goes)")
    parser.add_argument("--out", default="out/serve_load")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GLOG_v", "3")

    from dvt_shared.datasets import load_fashion_mnist

    pixels = load_fashion_mnist()["test_images"]
    results = [asyncio.run(sweep(name, args, pixels)) for name in args.configs]
    for r in results:
        if "mismatch" in r:
            r["mismatch"] = offline_decisions(pixels[: args.mismatch_images], r["mismatch"])
    (Path(args.out) / "serve_load.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    plot(results, Path(args.out) / "serve_load.png")

    rows = [[r["config"], p["fraction"], p["offered_images_per_s"], p["images_per_s"], p["p50_ms"], p["p95_ms"],
             p["p99_ms"], str(p["mean_batch"]), str(p["exit_shares"]), p["mean_macs"] / 1e6, p["wait_ms_per_image"],
             p["run_ms_per_image"], p["refused_503"]] for r in results for p in r["points"]]
    print_table(["config", "load", "offered/s", "images/s", "p50 ms", "p95 ms", "p99 ms", "mean batch per stage",
                 "exit shares", "M MACs", "wait ms/img", "run ms/img", "503s"], rows)
    if any(r["config"] == "static" for r in results):
        print()
        print_table(["p99 <= ms", *[r["config"] for r in results], "dvt-stage / static"],
                    at_equal_p99(results, [20, 50, 100, 200, 500]))
    for r in results:
        for key in ("one_image_requests", "overload", "mismatch"):
            if key in r:
                print(f"\n{r['config']} {key}: {json.dumps(r[key])}")
    print(f"\nwrote {Path(args.out) / 'serve_load.json'} and {Path(args.out) / 'serve_load.png'}")


if __name__ == "__main__":
    main()
