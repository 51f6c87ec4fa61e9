"""The `dvt` command. Each subcommand is one `_add_*` function registering its parser and handler.

Errors end the command with one line on stderr and exit code 1 (2 for a bad command line);
`--debug` shows the traceback instead. Every path a command will write is checked before
it starts, so a long run never fails at its last step for want of a writable folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import numpy as np

from dvt_shared.io_utils import check_writable_dir, check_writable_file
from dvt_shared.models import ModelConfig, get_model_config, list_model_names, model_gflops, state_layout
from dvt_shared.weight_format import FORMAT_HELP, WeightMetadata, check_state_dict, load_canonical, save_canonical
from dvt_shared.weight_format import weight_format as _weight_format

from . import backends


class CommandError(Exception):
    """A failure to report as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.strip().lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def weight_format(path: str) -> str:
    """'pth', 'safetensors' or 'ckpt', from the file name of `path`."""
    try:
        return _weight_format(path)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _read(path: str, kind: str) -> tuple[dict[str, np.ndarray], WeightMetadata | None, list[float] | None]:
    """(tensors by release key, the canonical metadata or None, cumulative GMACs per exit or None)."""
    if not os.path.exists(path):
        raise CommandError(f"{path} does not exist")
    if kind == "safetensors":
        tensors, metadata = load_canonical(path)
        return tensors, metadata, metadata.exit_flops or None
    tensors, flops = backends.for_weights(kind).read_checkpoint(path)
    return tensors, None, flops


# Classifier weights: DVT stages' and VT-ResNet's `head`, a plain ResNet's `fc`, VT-FPN's 1x1 `classifier`.
_HEAD_MODULES = ("head", "fc", "classifier")


def _head_classes(tensors: dict[str, np.ndarray]) -> int | None:
    heads = [
        value.shape[0] for key, value in tensors.items()
        if key.endswith(".weight") and key[: -len(".weight")].rpartition(".")[2] in _HEAD_MODULES
        and value.ndim in (2, 4)
    ]
    return heads[0] if heads else None


def _resolve_config(
    src: str, model: str | None, num_classes: int | None, tensors: dict[str, np.ndarray], metadata
) -> ModelConfig:
    if metadata is not None:
        config = metadata.config
        if model is not None and model != config.name:
            raise CommandError(f"{src} holds a {config.name} model, but --model {model} was given")
        if num_classes is not None and num_classes != config.num_classes:
            raise CommandError(f"{src} holds {config.num_classes} classes, but --num-classes {num_classes} was given")
        return config
    if model is None:
        raise CommandError(f"{src} does not record its model: "
                           f"pass --model NAME (one of {', '.join(list_model_names())})")
    num_classes = num_classes if num_classes is not None else _head_classes(tensors)
    try:
        return get_model_config(model, num_classes=num_classes)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def read_weights(path: str, model: str | None = None, num_classes: int | None = None):
    """(config, checked tensors by release key, canonical metadata or None, cumulative GMACs or None) of any format."""
    # a folder is named as one before its name is read as a format
    if os.path.isdir(path):
        raise CommandError(f"{path} is a directory, not a weight file: pass one file ({FORMAT_HELP})")
    tensors, metadata, flops = _read(path, weight_format(path))
    config = _resolve_config(path, model, num_classes, tensors, metadata)
    return config, _checked(config, tensors, source=path), metadata, flops


def _checked(config: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The tensors, checked against the layout `config` describes (no framework needed), as float32 in its order."""
    layout = state_layout(config)
    check_state_dict(layout, tensors, source=source)
    return {key: np.asarray(tensors[key], dtype=np.float32) for key in layout}


def _write(path: str, kind: str, tensors: dict[str, np.ndarray], config: ModelConfig, metadata, flops) -> None:
    if kind == "safetensors":
        if metadata is None:
            metadata = WeightMetadata(config=config, exit_flops=flops or list(model_gflops(config)))
        save_canonical(path, tensors, metadata)
    else:
        backends.for_weights(kind).write_checkpoint(path, tensors, flops)


def _convert(args: argparse.Namespace) -> None:
    dst_kind = weight_format(args.dst)
    config, tensors, metadata, flops = read_weights(args.src, args.model, args.num_classes)
    _write(args.dst, dst_kind, tensors, config, metadata, flops)
    print(f"wrote {args.dst} ({config.name}, {len(tensors)} tensors)")


def _add_convert(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "convert",
        parents=[common],
        help="convert weights between the release .pth, canonical .safetensors and MindSpore .ckpt",
        description=f"Convert DVT weights; formats follow the file extensions: {FORMAT_HELP}.",
    )
    parser.add_argument("src", help="weights to read")
    parser.add_argument("dst", help="file to write (replaced atomically)")
    parser.add_argument(
        "--model", choices=list_model_names(), metavar="NAME",
        help=f"registered config of the weights, needed when SRC records none (.pth, .ckpt): "
             f"{', '.join(list_model_names())}",
    )
    parser.add_argument(
        "--num-classes", type=positive_int, help="classes of the heads (default: read from the weights' head)",
    )
    parser.set_defaults(handler=_convert)


def _train(args: argparse.Namespace) -> None:
    backends.load("torch").run_training(args)


def _add_train(subparsers, common: argparse.ArgumentParser) -> None:
    from dvt_shared.train_options import add_train_arguments

    parser = subparsers.add_parser(
        "train", parents=[common], help="train a DVT (PyTorch; multi-process with torchrun)",
        description="Train with the multi-exit loss. On several processes: "
                    "torchrun --nproc_per_node N -m dvt_torch.train ... (same options).",
    )
    add_train_arguments(parser)
    parser.set_defaults(handler=_train)


def _subcommands() -> tuple[Callable, ...]:
    from .demo import add_demo
    from .evaluate import add_evaluate
    from .inference import add_calibrate, add_export, add_predict

    return (_add_convert, _add_train, add_calibrate, add_predict, add_export, add_evaluate, add_demo)


def build_parser(train_recipe: dict | None = None) -> argparse.ArgumentParser:
    debug_help = "show the full traceback of an error"
    verbose_help = "show MindSpore's C++ log lines (silenced by default)"
    parser = _Parser(prog="dvt", description="Dynamic Vision Transformer tools.")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    # Also accepted after the subcommand; SUPPRESS keeps a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _subcommands():
        add(subparsers, common)
    # a recipe's values become the train options' defaults, so that options given on the command line win
    subparsers.choices["train"].set_defaults(**(train_recipe or {}))
    return parser


def _outputs(args: argparse.Namespace) -> list[tuple[str, Callable[[str], str]]]:
    """Every path `args.command` will write, with the check it must pass first."""
    if args.command == "convert":
        return [(args.dst, check_writable_file)]
    if args.command == "calibrate" and args.out:
        return [(args.out, check_writable_file)]
    if args.command in ("export", "evaluate", "demo") or (args.command == "train" and args.out):
        return [(args.out, check_writable_dir)]
    return []


def quiet_mindspore(verbose: bool) -> None:
    """Silence MindSpore's C++ logging (GLOG_v=3: errors only) unless `verbose`; it is read when
    MindSpore is first imported, so call this before. A GLOG_v the user set stands."""
    if not verbose:
        os.environ.setdefault("GLOG_v", "3")


def _train_recipe(argv: list[str]) -> dict:
    """The option values of the recipe a `dvt train --config RECIPE` names, as the train parser's defaults."""
    from dvt_shared.train_options import recipe_defaults

    command = argparse.ArgumentParser(add_help=False)
    command.add_argument("command", nargs="?")
    known, _ = command.parse_known_args(argv)
    return recipe_defaults(argv) if known.command == "train" else {}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        recipe = _train_recipe(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dvt train: error: {exc}", file=sys.stderr)
        return 1
    args = build_parser(recipe).parse_args(argv)
    quiet_mindspore(args.verbose)
    try:
        for path, check in _outputs(args):
            check(path)
        args.handler(args)
    except Exception as exc:
        if args.debug:
            raise
        # Multi-line messages (every mismatched tensor) are kept whole, on one line.
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"dvt {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0
