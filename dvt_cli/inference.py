"""`dvt calibrate`, `dvt predict` and `dvt export`: thresholds, early-exit classification, graphs."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dvt_shared.exit_policy import EXIT_POLICIES, MAX_SOFTMAX

from . import CommandError, backends, positive_float, positive_int, read_weights
from .images import image_paths, load_images

# The backend that scores data sets (calibrate, evaluate); predict takes --backend.
SCORING_BACKEND = "torch"


def parse_thresholds(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from exc


def all_exit_logits(
    config, tensors, images: np.ndarray, backend: str = SCORING_BACKEND, batch: int = 256, precision: str = "fp32"
) -> np.ndarray:
    """(exits, n, classes) logits of every exit (one for a VT model) of the model `config` and `tensors`
    describe, run by `backend` at `precision`."""
    backends.check_precision(precision, backend)
    facade = backends.load(backend)
    return facade.all_exit_logits(facade.inference_model(config, tensors), images, batch, precision)


def search_thresholds(config, tensors, policy, images: np.ndarray, labels: np.ndarray, **target):
    """(thresholds, their `DynamicResult`) that `policy` finds for `target` (p=, budget= or accuracy=) on the
    labelled `images`, scored by every exit of the model."""
    from dvt_shared import calibration
    from dvt_shared.exit_policy import softmax
    from dvt_shared.flops import exit_gflops

    gflops = np.asarray(exit_gflops(config))
    probs = softmax(all_exit_logits(config, tensors, images))
    calibration.check_calibration_data(probs, labels)
    thresholds = calibration.search(policy, probs, labels, gflops, **target)
    return thresholds, calibration.dynamic_evaluate(probs, labels, gflops, thresholds, policy)


def _calibrate(args: argparse.Namespace) -> None:
    from dvt_shared import exit_policy
    from dvt_shared.flops import exit_gflops
    from dvt_shared.weight_format import save_canonical

    from .datasets import model_data, open_for_model, split_images

    if not args.weights.endswith(".safetensors"):
        raise CommandError("calibrate stores thresholds in a canonical .safetensors file; convert the weights first")
    config, tensors, metadata, _ = read_weights(args.weights)
    gflops = np.asarray(exit_gflops(config))
    # Checked before the images are scored, which is the slow part.
    if args.budget is not None and args.budget < gflops[0]:
        raise CommandError(
            f"--budget {args.budget} is below {gflops[0]:.6g}, the GFLOPs of the first exit of {config.name}, "
            "the least any policy spends per image"
        )
    policy = exit_policy.exit_policy(args.exit_policy)
    data = model_data(config, metadata, args.weights)
    dataset = open_for_model(args, config, data, args.weights)
    images, labels = split_images(dataset, args.split, data, args.limit)
    target = {"budget": args.budget} if args.budget is not None else (
        {"accuracy": args.accuracy} if args.accuracy is not None else {"p": args.p})
    thresholds, result = search_thresholds(config, tensors, policy, images, labels, **target)
    metadata.thresholds = [float(t) for t in thresholds]
    metadata.exit_policy = policy.name
    # weights that recorded no data config keep the one they were read with, named by the data's classes where
    # the data name them
    if metadata.data_config is None:
        metadata.data_config = data.replace(class_names=dataset.classes) if dataset.named else data
    save_canonical(args.out or args.weights, tensors, metadata)
    print(f"{policy.name} thresholds {metadata.thresholds} on {len(images)} {args.split} images: "
          f"accuracy {result.accuracy:.2f}%, {result.expected_flops:.4f} GFLOPs on average, "
          f"exits {result.exit_counts.tolist()}; "
          f"written to {args.out or args.weights}")


def add_calibrate(subparsers, common: argparse.ArgumentParser) -> None:
    from .datasets import add_data_arguments

    parser = subparsers.add_parser(
        "calibrate", parents=[common], help="find exit thresholds on held-out data and store them with the weights",
        description="Score labelled images with every exit, find thresholds with the shared exit policy (the "
                    "release's geometric shares for --p, or the best for a --budget in GFLOPs, or the cheapest "
                    "reaching an --accuracy in %%), and store them in the canonical weights' metadata. It reads the "
                    "TRAINING split of --data by default (--split train), as the release does, and the val split "
                    "only when asked (--split val): thresholds tuned on the images a model is evaluated on overstate "
                    "its accuracy. Images are read as the weights' data config says (class names, size, "
                    "normalisation).",
    )
    parser.add_argument("--weights", required=True, help="canonical .safetensors weights")
    add_data_arguments(parser)
    parser.add_argument("--split", choices=("train", "val", "test"), default="train",
                        help="split to calibrate on (default train, as the release does; val, alias test, only "
                             "when asked)")
    parser.add_argument("--limit", type=positive_int, default=10000,
                        help="images to use, drawn once (seed 0) from the split (default 10000)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--p", type=positive_float, default=1.0,
                        help="release's geometric exit shares proportional to p^k")
    target.add_argument("--budget", type=positive_float, help="target average GFLOPs per image")
    target.add_argument("--accuracy", type=positive_float, help="target accuracy in %%")
    parser.add_argument("--exit-policy", choices=tuple(EXIT_POLICIES), default=MAX_SOFTMAX.name,
                        help="the confidence an image stops on: max-softmax (the release's) or entropy "
                             "(1 - entropy / log classes); stored with the thresholds")
    parser.add_argument("--out", help="write here instead of updating --weights in place")
    parser.set_defaults(handler=_calibrate)


def _check_predict_options(args: argparse.Namespace) -> None:
    ray_only = [option for option, value in (("--ray-address", args.ray_address), ("--actors", args.actors),
                                             ("--batch-size", args.batch_size)) if value is not None]
    if ray_only and not args.ray:
        raise CommandError(f"{', '.join(ray_only)} {'applies' if len(ray_only) == 1 else 'apply'} only with --ray")
    if args.ray and not args.out:
        raise CommandError("--ray writes its rows to a parquet file: pass --out FILE.parquet")
    if args.out:  # before anything runs, as `dvt` checks every output (dvt_cli._outputs)
        from dvt_shared.io_utils import check_writable_file

        check_writable_file(args.out)


def _predict(args: argparse.Namespace) -> None:
    from dvt_shared.exit_policy import exit_policy
    from dvt_shared.flops import exit_gflops

    _check_predict_options(args)
    config, tensors, metadata, _ = read_weights(args.weights, args.model, args.num_classes)
    thresholds = args.thresholds or (metadata.thresholds if metadata is not None else None)
    if not thresholds:
        raise CommandError(f"{args.weights} holds no thresholds: run `dvt calibrate` or pass --thresholds")
    stored_policy = metadata.exit_policy if metadata is not None else MAX_SOFTMAX.name
    if args.thresholds is None and args.exit_policy not in (None, stored_policy):
        raise CommandError(
            f"{args.weights} holds thresholds for the {stored_policy} policy, not {args.exit_policy}: "
            f"run `dvt calibrate --exit-policy {args.exit_policy}` or pass --thresholds"
        )
    policy = exit_policy(args.exit_policy or stored_policy)
    if args.ray:
        from .datasets import model_data
        from .ray_predict import predict_on_ray

        backends.check_precision(args.precision, args.backend)  # here, not first in every actor
        predict_on_ray(args, config, tensors, thresholds, policy, model_data(config, metadata, args.weights))
        return
    from .datasets import model_data

    data = model_data(config, metadata, args.weights)
    paths = image_paths(args.images)
    images = load_images(paths, data)
    engine = backends.engine(
        args.backend, config, tensors, thresholds, graphs_dir=args.onnx_dir, precision=args.precision,
        exit_policy=policy,
    )
    prediction = engine.predict(images)
    names = data.class_names
    print(f"{'image':<40} {'class':<14} {'exit':>4} {'confidence':>10} {'GFLOPs':>8}")
    for path, cls, exit_index, conf, gflops in zip(
        paths, prediction.classes, prediction.exit_index, prediction.confidence, prediction.gflops
    ):
        label = names[cls] if names else str(cls)
        print(f"{path:<40} {label:<14} {exit_index:>4} {conf:>10.4f} {gflops:>8.4f}")
    print(f"average {prediction.gflops.mean():.4f} GFLOPs per image (every exit: {exit_gflops(config)[-1]:.4f}), "
          f"{policy.name} confidence")
    if args.out:
        from .results import result_columns, write_results

        write_results(args.out, result_columns(paths, prediction, names))


def add_predict(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "predict", parents=[common], help="classify image files with real early exit",
        description="Classify image files; each image runs only the stages it needs. Prints class, exit, "
                    "confidence and GFLOPs spent per image; --out also writes them to a parquet file. With --ray, "
                    "Ray Data reads, decodes and classifies the inputs in a pool of actors (one engine each) and "
                    "streams one row per image (path, class_index, label, exit, confidence, macs), in input order, "
                    "into ONE parquet file at --out, which replaces it only when the run completes.",
    )
    parser.add_argument("images", nargs="+", metavar="INPUT",
                        help="image files (PNG, JPEG, ...) and folders of images (recursive, by extension); with "
                             "--ray also parquet files of encoded images (binary column 'image' or 'bytes', "
                             "optional string column 'path'; rows without one are named FILE#ROW)")
    parser.add_argument("--weights", required=True, help="weights (.safetensors, .pth, .ckpt)")
    parser.add_argument("--backend", choices=tuple(backends.BACKENDS), default="torch")
    parser.add_argument("--precision", choices=backends.PRECISIONS, default="fp32",
                        help="fp32 (default); bf16 or fp16: PyTorch autocast (the performer in float32), or for "
                        "--backend mindspore fp16 as Ascend's Cube unit computes")
    parser.add_argument("--thresholds", type=parse_thresholds, help="comma-separated, one per exit "
                        "(default: the calibrated ones stored with the weights)")
    parser.add_argument("--exit-policy", choices=tuple(EXIT_POLICIES), default=None,
                        help="the confidence an image stops on (default: the policy the stored thresholds were "
                             "calibrated for; with --thresholds, max-softmax)")
    parser.add_argument("--onnx-dir", help="graphs from `dvt export --format onnx` (default: export to a temp dir)")
    parser.add_argument("--model", help="registered config, for weights that record none")
    parser.add_argument("--num-classes", type=positive_int)
    parser.add_argument("--out", help="parquet file of the rows (one file; required with --ray)")
    scale = parser.add_argument_group("prediction at scale (Ray Data)")
    scale.add_argument("--ray", action="store_true",
                       help="run on Ray Data: a local Ray instance of this machine's CPUs, or --ray-address")
    scale.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. HOST:6379) instead; "
                       "its nodes need dvt installed and must see the inputs at the same paths")
    scale.add_argument("--actors", type=positive_int,
                       help="at most this many actors, one engine each (default: the cluster's CPUs - 1, at least 1)")
    scale.add_argument("--batch-size", type=positive_int, help="images per actor call (default 256)")
    parser.set_defaults(handler=_predict)


DEFAULT_EXPORT_GEARS = "1,2,4,8,16,32,64"


def _parse_gears(text: str) -> list[int] | str:
    """'dynamic' (one graph per stage, dynamic batch axis) as it is, else comma-separated batch sizes."""
    if text == "dynamic":
        return text
    try:
        gears = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"gears must be 'dynamic' or comma-separated batch sizes, got {text!r}") from exc
    if min(gears) < 1:
        raise argparse.ArgumentTypeError(f"gears must be batch sizes >= 1, got {text!r}")
    return gears


def _export(args: argparse.Namespace) -> None:
    from dvt_shared.data_config import apply_data_config

    from .datasets import model_data

    config, tensors, metadata, _ = read_weights(args.weights, args.model, args.num_classes)
    if args.gears is not None and args.format != "mindir":
        raise CommandError(f"--gears applies to --format mindir; {args.format} graphs have a dynamic batch axis")
    facade = backends.for_export(args.format)
    options = {}
    if args.format == "mindir":
        gears = args.gears or _parse_gears(DEFAULT_EXPORT_GEARS)
        options["gears"] = None if gears == "dynamic" else gears
    model = facade.inference_model(config, tensors)
    # the manifest records the weights' data config (class names, normalisation), which the model carries
    apply_data_config(model, model_data(config, metadata, args.weights))
    manifest = facade.export(model, args.out, **options)
    print(f"wrote {config.num_exits} {args.format} stage graphs and {Path(manifest).name} to {args.out}")


def add_export(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "export", parents=[common], help="export one graph per stage (ONNX or MindIR)",
        description="Export every stage as its own graph (inputs: images and the previous stage's reuse state; "
                    "outputs: logits and this stage's reuse state), plus a JSON manifest that also records the "
                    "weights' data config (class names, input size, mean, std, interpolation, crop).",
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--format", choices=backends.EXPORT_FORMATS, required=True)
    parser.add_argument("--gears", type=_parse_gears,
                        help=f"MindIR: batch sizes to write each stage for (default {DEFAULT_EXPORT_GEARS}: the fixed "
                             "shapes Ascend takes), or 'dynamic' for one graph per stage with a dynamic batch axis")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help="registered config, for weights that record none")
    parser.add_argument("--num-classes", type=positive_int)
    parser.set_defaults(handler=_export)
