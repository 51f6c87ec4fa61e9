"""The `dvt` command. Each subcommand is one `_add_*` function registering its parser and handler.

Errors end the command with one line on stderr and exit code 1 (2 for a bad command line);
`--debug` shows the traceback instead. Every path a command will write is checked before
it starts, so a long run never fails at its last step for want of a writable folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Sequence

from dvt_shared.io_utils import check_writable_dir, check_writable_file
from dvt_shared.models import list_model_names
from dvt_shared.weight_format import FORMAT_HELP

from . import backends
from .options import CommandError, positive_float, positive_int
from .weights import read_weights, weight_format, write_weights

__all__ = ["CommandError", "backends", "build_parser", "main", "positive_float", "positive_int", "read_weights"]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error of the command, and no abbreviated
    options: `--data` must never be taken for `--data-dir`, nor any prefix for an option it happens to start."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _convert(args: argparse.Namespace) -> None:
    dst_kind = weight_format(args.dst)
    config, tensors, metadata, flops = read_weights(args.src, args.model, args.num_classes)
    write_weights(args.dst, dst_kind, tensors, config, metadata, flops)
    data = metadata.data_config if metadata is not None else None
    if data is None:
        carried = "no data config: the source records none"
    elif dst_kind == "safetensors":
        carried = f"its data config: {len(data.class_names or ())} class names, mean {list(data.mean)}"
    else:
        carried = (f"a {dst_kind} file holds no data config: keep {args.src} for its class names and normalisation "
                   "(converting back to .safetensors from this file loses them)")
    print(f"wrote {args.dst} ({config.name}, {len(tensors)} tensors; {carried})")


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
    def read_checkpoint(path: str):
        """Another backend's weight file (a MindSpore .ckpt), read by the backend the table names for it."""
        return backends.for_weights(weight_format(path)).read_checkpoint(path)[0]

    backends.load("torch").run_training(args, read_checkpoint)


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
    from .serve import add_serve

    return (_add_convert, _add_train, add_calibrate, add_predict, add_export, add_serve, add_evaluate, add_demo)


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

    command = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    command.add_argument("command", nargs="?")
    known, _ = command.parse_known_args(argv)
    return recipe_defaults(argv) if known.command == "train" else {}


# Python's own way of showing a warning, for those that are not the command's.
_SHOW_WARNING = warnings.showwarning


def _warn_on_one_line(command: str) -> None:
    """Warnings (a fallback taken, images skipped or converted) as one line each, like the command's errors; the
    others as Python shows them. Set anew by each command run, never stacked on an earlier run's."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning):
            print(f"dvt {command}: warning: {message}", file=sys.stderr)
        else:
            _SHOW_WARNING(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        recipe = _train_recipe(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dvt train: error: {exc}", file=sys.stderr)
        return 1
    args = build_parser(recipe).parse_args(argv)
    quiet_mindspore(args.verbose)
    _warn_on_one_line(args.command)
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
