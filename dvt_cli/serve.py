"""`dvt serve`: early exit under live load on Ray Serve, speaking the Open Inference Protocol (KServe v2).

The weights and thresholds are read and checked here, before Ray starts; the application itself
(dvt_cli.serve_app) is imported only when the server starts, so `dvt --help` never imports Ray.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
import time

from dvt_serve.batching import BATCHING
from dvt_serve.spec import serve_default
from dvt_shared.exit_policy import EXIT_POLICIES, MAX_SOFTMAX, last_exit_only

from . import CommandError, backends, positive_float, positive_int, read_weights
from .options import non_negative_float

APP_NAME = "dvt"


def _thresholds(args, config, tensors, metadata, data) -> tuple[list[float], str]:
    """(thresholds, exit policy name) from --thresholds, --budget (found on the training split of --data, read
    as the weights' data config `data` says), or those stored with the weights."""
    from dvt_shared.exit_policy import exit_policy

    stored = metadata.exit_policy if metadata is not None else MAX_SOFTMAX.name
    policy = exit_policy(args.exit_policy or stored)
    if config.num_exits == 1:  # a static model: every image stops at its one exit
        return last_exit_only(1).tolist(), policy.name
    if args.thresholds is not None:
        return args.thresholds, policy.name
    if args.budget is not None:
        from dvt_shared.datasets import FASHION_MNIST_CLASSES

        from .datasets import open_for_model, split_images
        from .inference import search_thresholds

        if args.data is None:
            if data.input_size != (1, 28, 28) or data.class_names not in (None, FASHION_MNIST_CLASSES):
                raise CommandError(f"--budget calibrates on labelled images: pass --data, the data set {args.weights} "
                                   "was trained on (its data config is not Fashion-MNIST's)")
            args.data = "fmnist"
        dataset = open_for_model(args, config, data, args.weights)
        images, labels = split_images(dataset, "train", data, args.calibration_images)
        thresholds, result = search_thresholds(config, tensors, policy, images, labels, budget=args.budget)
        print(f"{policy.name} thresholds for {args.budget} GFLOPs: {[float(t) for t in thresholds]} "
              f"({result.accuracy:.2f}% on {len(images)} training images, {result.expected_flops:.4f} GFLOPs)")
        return [float(t) for t in thresholds], policy.name
    if metadata is None or not metadata.thresholds:
        raise CommandError(f"{args.weights} holds no thresholds: run `dvt calibrate`, or pass --thresholds or "
                           "--budget")
    if args.exit_policy not in (None, stored):
        raise CommandError(f"{args.weights} holds thresholds for the {stored} policy, not {args.exit_policy}: "
                           "pass --thresholds or --budget")
    return list(metadata.thresholds), policy.name


def serve_spec(args):
    """The `ServeSpec` of the command line: weights read and checked, thresholds resolved."""
    from dvt_serve.spec import ServeSpec

    from .datasets import model_data

    backends.check_precision(args.precision, args.backend)
    config, tensors, metadata, _ = read_weights(args.weights, args.model, args.num_classes)
    if not hasattr(config, "num_exits"):
        raise CommandError(f"{config.name} is not a DVT: `dvt serve` serves early-exit cascades")
    data = model_data(config, metadata, args.weights)
    thresholds, policy = _thresholds(args, config, tensors, metadata, data)
    return ServeSpec(
        config, tensors, thresholds, policy, data=data, backend=args.backend, precision=args.precision,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, batching=args.batching,
        max_body=args.max_body, threads=args.threads,
    )


def _ray_init(args) -> None:
    import ray

    options = {"include_dashboard": False, "log_to_driver": args.verbose, "configure_logging": False}
    if args.metrics_export_port:
        options["_metrics_export_port"] = args.metrics_export_port
    if args.ray_address:
        ray.init(address=args.ray_address, **options)
    else:
        ray.init(address="local", **options)


def _serve(args: argparse.Namespace) -> None:
    spec = serve_spec(args)
    import ray
    from ray import serve

    from .serve_app import application

    _ray_init(args)
    counter = None
    try:
        if args.stop_after:
            counter = ray.remote(num_cpus=0)(RequestCounter).remote()
            spec = dataclasses.replace(spec, request_counter=counter)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(spec, args.replicas, args.replica_cpus), name=APP_NAME, route_prefix="/")
        # set last: ray.init installs a SIGTERM handler of its own, and Ray restores SIGINT's after deferring it
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(f"serving {spec.config.name} ({args.backend}, {args.precision}, {args.batching} batching, "
              f"{args.replicas} replica(s)) at http://{args.host}:{args.port}/v2/models/{spec.config.name}",
              flush=True)
        while not stop.wait(0.2):
            if counter is not None and ray.get(counter.count.remote()) >= args.stop_after:
                break
        # the application goes first: its replicas answer what they hold (graceful shutdown), then the proxy stops
        print("draining", flush=True)
        started = time.monotonic()
        serve.delete(APP_NAME)
        serve.shutdown()
        print(f"stopped after {time.monotonic() - started:.1f} s of draining", flush=True)
    finally:
        ray.shutdown()


class RequestCounter:
    """Inference requests answered by every replica (a Ray actor): `--stop-after` stops the server at a count."""

    def __init__(self):
        self.answered = 0

    def add(self) -> None:
        self.answered += 1

    def count(self) -> int:
        return self.answered


def add_serve(subparsers, common: argparse.ArgumentParser) -> None:
    from .datasets import add_data_arguments
    from .inference import parse_thresholds

    parser = subparsers.add_parser(
        "serve", parents=[common], help="serve early exit over HTTP on Ray Serve (Open Inference Protocol)",
        description="Serve a DVT with real early exit on Ray Serve, speaking the Open Inference Protocol (KServe v2, "
                    "as Triton, KServe and MLServer do; tritonclient works unchanged) and POST /v1/predict for one "
                    "PNG or JPEG. Each replica batches every stage across requests. Blocks until SIGINT or SIGTERM, "
                    "then answers the requests it holds and stops.",
    )
    parser.add_argument("--weights", required=True, help="weights (.safetensors, .pth, .ckpt)")
    parser.add_argument("--backend", choices=tuple(backends.BACKENDS), default=serve_default("backend"))
    parser.add_argument("--precision", choices=backends.PRECISIONS, default=serve_default("precision"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="replicas, each with its own engine")
    parser.add_argument("--replica-cpus", type=positive_float, default=1.0,
                        help="CPUs Ray reserves per replica (fractions allowed; default 1)")
    parser.add_argument("--threads", type=positive_int, default=serve_default("threads"),
                        help=f"compute threads per replica (default {serve_default('threads')})")
    parser.add_argument("--ray-address", help="join this Ray cluster (replicas spread over its machines, which "
                        "need the project installed); default: start a local Ray instance on this machine's CPUs")
    parser.add_argument("--max-batch", type=positive_int, default=serve_default("max_batch"),
                        help=f"images per stage batch (default {serve_default('max_batch')})")
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=serve_default("max_wait_ms"),
                        help="how long a stage's oldest image waits for a fuller batch "
                             f"(default {serve_default('max_wait_ms'):g} ms)")
    parser.add_argument("--max-queue", type=positive_int, default=serve_default("max_queue"),
                        help="images a replica holds at most; beyond it requests get 503 "
                             f"(default {serve_default('max_queue')})")
    parser.add_argument("--batching", choices=BATCHING, default=serve_default("batching"),
                        help="stage: a queue per stage, survivors of all requests batched together (default); "
                             "cascade: each batch of requests runs the whole cascade (for comparison)")
    parser.add_argument("--max-body", type=positive_int, default=serve_default("max_body"),
                        help=f"largest request body in bytes (default {serve_default('max_body')})")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--thresholds", type=parse_thresholds, help="comma-separated, one per exit "
                        "(default: the calibrated ones stored with the weights)")
    target.add_argument("--budget", type=positive_float,
                        help="GFLOPs per image: thresholds found at startup on the TRAIN split of --data")
    parser.add_argument("--calibration-images", type=positive_int, default=10000,
                        help="training images --budget calibrates on (default 10000)")
    add_data_arguments(parser, default=None).description = (
        "what --budget calibrates on (its train split): default fmnist for weights whose data config is "
        "Fashion-MNIST's; other weights need --data")
    parser.add_argument("--exit-policy", choices=tuple(EXIT_POLICIES), default=None,
                        help="the confidence an image stops on (default: the stored thresholds' policy)")
    parser.add_argument("--model", help="registered config, for weights that record none")
    parser.add_argument("--num-classes", type=positive_int)
    parser.add_argument("--metrics-export-port", type=positive_int,
                        help="port of Ray's Prometheus metrics (Serve's and dvt_*), local Ray instance only")
    parser.add_argument("--stop-after", type=positive_int,
                        help="stop (and drain) after this many inference requests (POST; refused ones count): "
                             "smoke tests and benchmarks")
    parser.set_defaults(handler=_serve)
