"""`dvt calibrate`, `dvt predict` and `dvt export`: thresholds, early-exit classification, graphs."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from dvt_shared.configs import DVTConfig

from . import CommandError, positive_float, positive_int, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("torch", "mindspore", "onnx")
# The backend that runs each precision: fp16 as Ascend computes it (MindSpore), bf16 by autocast (PyTorch).
PRECISION_BACKENDS = {"fp32": BACKENDS, "fp16": ("mindspore",), "bf16": ("torch",)}


def check_precision(precision: str, backend: str) -> None:
    if backend not in PRECISION_BACKENDS[precision]:
        raise CommandError(
            f"--precision {precision} does not exist for --backend {backend}: "
            f"{precision} runs on {' or '.join(PRECISION_BACKENDS[precision])}"
        )


def torch_model(config, tensors):
    """The PyTorch model `config` describes (DVT or VT), holding `tensors`, in eval mode."""
    from dvt_torch.convert import from_canonical
    from dvt_torch.vt import build_model

    return from_canonical(build_model(config), tensors).eval()


# PIL modes of 16- and 32-bit grey images, whose convert("L") clips every value above 255.
_WIDE_GREY_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}


def _eight_bit(image):
    """`image` loaded, with 16-bit grey scaled to 8 bits (0..65535 -> 0..255) instead of clipped."""
    from PIL import Image

    image.load()
    if image.mode not in _WIDE_GREY_MODES:
        return image
    # PNG's 16-bit grey opens as "I;16" or "I": its values stay in 0..65535.
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 / (2 ** _WIDE_GREY_MODES[image.mode] - 1)
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def load_images(paths: list[str], config: DVTConfig) -> np.ndarray:
    """Image files as the model's float32 input batch.

    One-channel models get grey images resized to the model's size and Fashion-MNIST's
    normalisation; three-channel models get the release's evaluation transform (resize the
    short side to size / 0.875 with bicubic, centre crop, ImageNet mean and std).
    """
    from PIL import Image

    from dvt_shared.datasets import normalise_fashion_mnist

    batch = []
    for path in paths:
        if not os.path.isfile(path):
            raise CommandError(f"{path} is not an image file")
        try:
            with Image.open(path) as image:
                image = _eight_bit(image)
                if config.in_chans == 1:
                    grey = image.convert("L").resize((config.img_size, config.img_size), Image.BILINEAR)
                    array = normalise_fashion_mnist(np.asarray(grey)[None])[0]
                else:
                    rgb = image.convert("RGB")
                    short = round(config.img_size / 0.875)
                    scale = short / min(rgb.size)
                    rgb = rgb.resize((max(short, round(rgb.width * scale)), max(short, round(rgb.height * scale))), Image.BICUBIC)
                    left, top = (rgb.width - config.img_size) // 2, (rgb.height - config.img_size) // 2
                    rgb = rgb.crop((left, top, left + config.img_size, top + config.img_size))
                    array = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
                    array = (array - np.reshape(IMAGENET_MEAN, (3, 1, 1))) / np.reshape(IMAGENET_STD, (3, 1, 1))
        except OSError as exc:
            raise CommandError(f"{path}: cannot read it as an image ({exc})") from exc
        batch.append(array.astype(np.float32))
    return np.stack(batch)


def _parse_thresholds(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from exc


def _calibration_images(args, config: DVTConfig) -> tuple[np.ndarray, np.ndarray]:
    if args.data != "fmnist":
        raise CommandError(f"--data {args.data!r}: only 'fmnist' (the embedded default data set) is supported here")
    if config.in_chans != 1 or config.img_size != 28:
        raise CommandError(f"{config.name} takes {config.in_chans}x{config.img_size}x{config.img_size} images, not Fashion-MNIST's 1x28x28")
    from dvt_shared.datasets import load_fashion_mnist, normalise_fashion_mnist

    data = load_fashion_mnist(args.data_dir)
    images, labels = data[f"{args.split}_images"], data[f"{args.split}_labels"]
    rows = np.random.default_rng(0).permutation(len(images))[: args.limit]
    return normalise_fashion_mnist(images[rows]), labels[rows].astype(np.int64)


def all_exit_probs(model, images: np.ndarray, batch: int = 256, precision: str = "fp32") -> np.ndarray:
    """(exits, n, classes) softmax outputs of every exit (one for a VT model), PyTorch at `precision`
    (fp32 or bf16), in batches with a progress bar."""
    import torch
    from tqdm import tqdm

    from dvt_shared.exit_policy import softmax
    from dvt_torch.engine import autocast_for
    from dvt_torch.vt import exit_logits

    chunks = []
    with torch.inference_mode(), autocast_for("cpu", precision):
        for start in tqdm(range(0, len(images), batch), desc=f"scoring ({precision})", unit="batch", leave=False):
            outputs = exit_logits(model(torch.from_numpy(images[start:start + batch])))
            chunks.append(np.stack([o.float().numpy() for o in outputs]))
    return softmax(np.concatenate(chunks, axis=1))


def mindspore_all_exit_probs(config, tensors, images: np.ndarray, precision: str = "fp32", batch: int = 500) -> np.ndarray:
    """(exits, n, classes) softmax outputs of a DVT's every exit in MindSpore graph mode at `precision`
    (fp32 or fp16), in batches with a progress bar."""
    import mindspore as ms
    from tqdm import tqdm

    from dvt_mindspore.convert import from_canonical
    from dvt_mindspore.dvt import DVT
    from dvt_mindspore.engine import AllExitLogits
    from dvt_shared.exit_policy import softmax

    ms.set_context(mode=ms.GRAPH_MODE)
    run = AllExitLogits(from_canonical(DVT(config), tensors), precision)
    chunks = []
    for start in tqdm(range(0, len(images), batch), desc=f"MindSpore ({precision})", unit="batch", leave=False):
        chunks.append(np.stack([o.asnumpy() for o in run(ms.Tensor(images[start:start + batch]))]))
    return softmax(np.concatenate(chunks, axis=1))


def _calibrate(args: argparse.Namespace) -> None:
    from dvt_shared import exit_policy
    from dvt_shared.flops import exit_gflops
    from dvt_shared.weight_format import save_canonical

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
    images, labels = _calibration_images(args, config)
    probs = all_exit_probs(torch_model(config, tensors), images)
    exit_policy.check_calibration_data(probs, labels)
    if args.budget is not None:
        thresholds = exit_policy.thresholds_for_budget(probs, gflops, args.budget)
    elif args.accuracy is not None:
        thresholds = exit_policy.thresholds_for_accuracy(probs, labels, gflops, args.accuracy)
    else:
        thresholds = exit_policy.find_thresholds(probs, exit_policy.exit_shares(args.p, config.num_exits))
    result = exit_policy.dynamic_evaluate(probs, labels, gflops, thresholds)
    metadata.thresholds = [float(t) for t in thresholds]
    save_canonical(args.out or args.weights, tensors, metadata)
    print(f"thresholds {metadata.thresholds} on {len(images)} {args.split} images: accuracy {result.accuracy:.2f}%, "
          f"{result.expected_flops:.4f} GFLOPs on average, exits {result.exit_counts.tolist()}; "
          f"written to {args.out or args.weights}")


def add_calibrate(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "calibrate", parents=[common], help="find exit thresholds on held-out data and store them with the weights",
        description="Score held-out images with every exit, find thresholds with the shared exit policy (the "
                    "release's geometric shares for --p, or the best for a --budget in GFLOPs, or the cheapest "
                    "reaching an --accuracy in %%), and store them in the canonical weights' metadata.",
    )
    parser.add_argument("--weights", required=True, help="canonical .safetensors weights")
    parser.add_argument("--data", default="fmnist", help="calibration data: 'fmnist' (default)")
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="split to calibrate on (default train, as the release does; never tune on test)")
    parser.add_argument("--limit", type=positive_int, default=10000, help="images to use (default 10000)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--p", type=positive_float, default=1.0,
                        help="release's geometric exit shares proportional to p^k")
    target.add_argument("--budget", type=positive_float, help="target average GFLOPs per image")
    target.add_argument("--accuracy", type=positive_float, help="target accuracy in %%")
    parser.add_argument("--out", help="write here instead of updating --weights in place")
    parser.set_defaults(handler=_calibrate)


def _predict(args: argparse.Namespace) -> None:
    from dvt_shared.flops import exit_gflops

    config, tensors, metadata, _ = read_weights(args.weights, args.model, args.num_classes)
    thresholds = args.thresholds or (metadata.thresholds if metadata is not None else None)
    if not thresholds:
        raise CommandError(f"{args.weights} holds no thresholds: run `dvt calibrate` or pass --thresholds")
    check_precision(args.precision, args.backend)
    images = load_images(args.images, config)
    if args.backend == "torch":
        import torch

        from dvt_torch.engine import AdaptiveDVT

        engine = AdaptiveDVT(torch_model(config, tensors), thresholds, precision=args.precision)
        prediction = engine.predict(torch.from_numpy(images))
    elif args.backend == "mindspore":
        import mindspore as ms

        from dvt_mindspore.convert import from_canonical
        from dvt_mindspore.dvt import DVT
        from dvt_mindspore.engine import AdaptiveDVT

        ms.set_context(mode=ms.GRAPH_MODE)
        engine = AdaptiveDVT(from_canonical(DVT(config), tensors), thresholds, precision=args.precision)
        prediction = engine.predict(ms.Tensor(images))
    else:
        from dvt_torch.onnx_export import OnnxAdaptiveDVT, export_onnx

        onnx_dir = args.onnx_dir
        if onnx_dir is None:
            import tempfile

            onnx_dir = tempfile.mkdtemp(prefix="dvt_onnx_")
            export_onnx(torch_model(config, tensors), onnx_dir)
        prediction = OnnxAdaptiveDVT(onnx_dir, thresholds).predict(images)
    names = _class_names(config)
    print(f"{'image':<40} {'class':<14} {'exit':>4} {'confidence':>10} {'GFLOPs':>8}")
    for path, cls, exit_index, conf, gflops in zip(
        args.images, prediction.classes, prediction.exit_index, prediction.confidence, prediction.gflops
    ):
        label = names[cls] if names else str(cls)
        print(f"{path:<40} {label:<14} {exit_index:>4} {conf:>10.4f} {gflops:>8.4f}")
    print(f"average {prediction.gflops.mean():.4f} GFLOPs per image (every exit: {exit_gflops(config)[-1]:.4f})")


def _class_names(config: DVTConfig) -> tuple[str, ...] | None:
    from dvt_shared.datasets import FASHION_MNIST_CLASSES

    return FASHION_MNIST_CLASSES if config.in_chans == 1 and config.num_classes == len(FASHION_MNIST_CLASSES) else None


def add_predict(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "predict", parents=[common], help="classify image files with real early exit",
        description="Classify image files; each image runs only the stages it needs. Prints class, exit, "
                    "confidence and GFLOPs spent per image.",
    )
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--weights", required=True, help="weights (.safetensors, .pth, .ckpt)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--precision", choices=tuple(PRECISION_BACKENDS), default="fp32",
                        help="fp32 (default); fp16 = MindSpore computing as Ascend does; bf16 = PyTorch autocast")
    parser.add_argument("--thresholds", type=_parse_thresholds, help="comma-separated, one per exit "
                        "(default: the calibrated ones stored with the weights)")
    parser.add_argument("--onnx-dir", help="graphs from `dvt export --format onnx` (default: export to a temp dir)")
    parser.add_argument("--model", help="registered config, for weights that record none")
    parser.add_argument("--num-classes", type=positive_int)
    parser.set_defaults(handler=_predict)


DEFAULT_EXPORT_GEARS = "1,2,4,8,16,32,64"


def _parse_gears(text: str) -> list[int] | str:
    """'dynamic' (one graph per stage, dynamic batch axis) as it is, else comma-separated batch sizes."""
    if text == "dynamic":
        return text
    try:
        gears = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"gears must be 'dynamic' or comma-separated batch sizes, got {text!r}") from exc
    if min(gears) < 1:
        raise argparse.ArgumentTypeError(f"gears must be batch sizes >= 1, got {text!r}")
    return gears


def _export(args: argparse.Namespace) -> None:
    config, tensors, _, _ = read_weights(args.weights, args.model, args.num_classes)
    if args.format == "onnx":
        if args.gears is not None:
            raise CommandError("--gears applies to --format mindir; ONNX graphs have a dynamic batch axis")
        from dvt_torch.onnx_export import export_onnx

        manifest = export_onnx(torch_model(config, tensors), args.out)
    else:
        import mindspore as ms

        from dvt_mindspore.convert import from_canonical
        from dvt_mindspore.dvt import DVT
        from dvt_mindspore.mindir_export import export_mindir

        ms.set_context(mode=ms.GRAPH_MODE)
        gears = args.gears or _parse_gears(DEFAULT_EXPORT_GEARS)
        manifest = export_mindir(from_canonical(DVT(config), tensors), args.out, None if gears == "dynamic" else gears)
    print(f"wrote {config.num_exits} {args.format} stage graphs and {Path(manifest).name} to {args.out}")


def add_export(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "export", parents=[common], help="export one graph per stage (ONNX or MindIR)",
        description="Export every stage as its own graph (inputs: images and the previous stage's reuse state; "
                    "outputs: logits and this stage's reuse state), plus a JSON manifest.",
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--format", choices=("onnx", "mindir"), required=True)
    parser.add_argument("--gears", type=_parse_gears,
                        help=f"MindIR: batch sizes to write each stage for (default {DEFAULT_EXPORT_GEARS}: the fixed "
                             "shapes Ascend takes), or 'dynamic' for one graph per stage with a dynamic batch axis")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help="registered config, for weights that record none")
    parser.add_argument("--num-classes", type=positive_int)
    parser.set_defaults(handler=_export)
