"""The `--data` options every command that reads a labelled data set shares (calibrate, evaluate, serve
--budget), and that data set opened for a model: checked against the classes its weights record, decoded
by their data config (`dvt_shared.data_sources`)."""
from __future__ import annotations

import argparse

import numpy as np

from dvt_shared.data_config import DataConfig, weights_data_config
from dvt_shared.data_sources import (
    DEFAULT_LABEL_COLUMN,
    FMNIST,
    DataError,
    DataSet,
    check_classes,
    load_split,
    open_data,
)

from .options import CommandError, fraction

DATA_HELP = ("'fmnist' (the embedded Fashion-MNIST, default), an image folder (DIR/train/CLASS/* and DIR/val/CLASS/*, "
             "or DIR/CLASS/* with --val-split), or parquet files of encoded images with a label column (FILE.parquet "
             "or a folder of them, with --val-split; or DIR/train/ and DIR/val/ folders of them)")


def add_data_arguments(parser: argparse.ArgumentParser, default: str | None = FMNIST) -> argparse._ArgumentGroup:
    """--data and the options that say how to read and split it."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=default, help=DATA_HELP)
    group.add_argument("--val-split", type=fraction, default=None, metavar="F",
                       help="--data holds no train/ and val/: hold out the fraction F of every class as the val "
                            "split (the same F and --seed as `dvt train` used, to hold out the same images)")
    group.add_argument("--seed", type=int, default=0, help="seed of the --val-split draw (default 0, as dvt train's)")
    group.add_argument("--label-column", default=DEFAULT_LABEL_COLUMN,
                       help=f"parquet: the column of labels, class indices or names (default {DEFAULT_LABEL_COLUMN})")
    group.add_argument("--data-dir",
                       help="folder with the four Fashion-MNIST IDX files (default: the Debian package's)")
    return group


def model_data(config, metadata, source: str) -> DataConfig:
    """The data config the weights record (checked), or the default rule with a warning said once."""
    try:
        return weights_data_config(config, metadata, source)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def open_for_model(args, config, data: DataConfig, source: str) -> DataSet:
    """The data set `args` name, checked against the model's classes (names where the weights record them)."""
    try:
        dataset = open_data(args.data, args.val_split, args.seed, args.data_dir, args.label_column,
                            class_names=data.class_names)
        check_classes(dataset, data, config.num_classes, source)
    except (DataError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from exc
    return dataset


def split_images(dataset: DataSet, split: str, data: DataConfig, limit: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 model input, int64 labels) of at most `limit` images of a split (a seeded draw), decoded."""
    chosen = dataset.split(split).sample(limit, seed)
    where = f"{dataset.location if dataset.kind != FMNIST else FMNIST} ({split})"
    try:
        return load_split(chosen, data, where)
    except DataError as exc:
        raise CommandError(str(exc)) from exc
