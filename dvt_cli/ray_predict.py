"""`dvt predict --ray`: early-exit classification of many images on Ray Data, and the results file
(one parquet file, one row per image) that `dvt predict --out` writes with or without Ray.

The inputs are image files, folders of images (recursive, by extension) and parquet files of encoded
images. Ray Data reads them (`read_binary_files`, `read_parquet`), decodes them with the very function
single-process `dvt predict` uses (`dvt_cli.inference.decode_image`) in tasks, and classifies them in a
pool of actors, each holding one engine built once from weights the driver read once. The driver
streams the rows, in input order, into one parquet file that replaces --out when the run completes.

Ray is imported only when `--ray` is given, so the rest of the `dvt` command never needs it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass

import numpy as np

from dvt_shared.data_sources import DataError, parquet_image_column

from .images import decode_image, folder_images
from .options import CommandError
from .results import require, result_columns, results_writer

# --- inputs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Group:
    """Consecutive inputs that one Ray Data run reads: image files, or parquet files sharing a layout."""

    kind: str  # "images" or "parquet"
    paths: tuple[str, ...]
    image_column: str | None = None  # parquet: the column of encoded images
    has_path: bool = False  # parquet: it has a `path` column

    @property
    def numbered(self) -> bool:
        """Its rows are named FILE#ROW (0-based), having no `path` column."""
        return self.kind == "parquet" and not self.has_path


def _parquet_layout(path: str) -> tuple[str, bool]:
    """(its column of encoded images, whether it has a string `path` column) of a parquet input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise CommandError(f"{path}: cannot read it as a parquet file ({exc})") from exc
    try:
        column = parquet_image_column(schema, path)
    except DataError as exc:
        raise CommandError(str(exc)) from None
    has_path = "path" in schema.names
    if has_path and not (pa.types.is_string(schema.field("path").type)
                         or pa.types.is_large_string(schema.field("path").type)):
        raise CommandError(f"{path}: its 'path' column holds {schema.field('path').type}, not strings")
    return column, has_path


def _is_image(path: str) -> bool:
    """Whether PIL recognises the file's header as an image (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def input_groups(inputs: list[str]) -> list[_Group]:
    """The inputs as groups of consecutive ones that one Ray Data read takes, in the order given;
    CommandError for an input that is neither an image file, a folder of images nor a parquet file
    of encoded images."""
    items = []  # (group key, path)
    for item in inputs:
        if os.path.isdir(item):
            items += [(("images",), path) for path in folder_images(item)]
        elif os.path.isfile(item) and item.lower().endswith(".parquet"):
            items.append((("parquet", *_parquet_layout(item)), item))
        elif os.path.isfile(item) and _is_image(item):
            items.append((("images",), item))
        else:
            reason = "" if os.path.exists(item) else " (it does not exist)"
            raise CommandError(f"{item} is neither an image file, a folder of images nor a parquet file of "
                               f"encoded images{reason}")
    return [_Group(key[0], tuple(path for _, path in group), *key[1:])
            for key, group in itertools.groupby(items, key=lambda kv: kv[0])]


# --- the Ray Data pipeline ------------------------------------------------------------------------

def _decode(batch, *, image_column: str, numbered: bool, data):
    """Encoded images -> the model's input, decoded by `decode_image`. A row that does not decode keeps
    a blank image and its error, which the driver reports (a task's exception would reach it only as
    Ray's traceback text)."""
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), *data.input_size), dtype=np.float32)
    errors = [""] * len(paths)
    for i, (path, encoded) in enumerate(zip(paths, batch[image_column])):
        name = f"{path} (a row of it)" if numbered else path
        try:
            images[i] = decode_image(bytes(encoded), data, name)
        except CommandError as exc:
            errors[i] = str(exc)
    return {"path": np.asarray(paths, dtype=object), "image": images, "error": np.asarray(errors, dtype=object)}


class _Predictor:
    """One early-exit engine per actor, built once from the weights the driver put in the object store."""

    def __init__(self, backend, config, tensors_ref, thresholds, onnx_dir, precision, policy_name, names, glog_v):
        import ray

        from dvt_shared.exit_policy import exit_policy

        from . import backends

        if glog_v is not None:  # before MindSpore is imported, as `dvt` does (quiet_mindspore)
            os.environ.setdefault("GLOG_v", glog_v)
        self.names = names
        # writable copies: the object store's arrays are read-only views, which torch warns about
        tensors = {key: np.array(value) for key, value in ray.get(tensors_ref).items()}
        self.engine = backends.engine(backend, config, tensors, thresholds, graphs_dir=onnx_dir,
                                      precision=precision, exit_policy=exit_policy(policy_name))

    def __call__(self, batch):
        good = np.flatnonzero(batch["error"] == "")
        n = len(batch["path"])
        columns = {"class_index": np.full(n, -1, np.int64), "label": np.full(n, "", dtype=object),
                   "exit": np.full(n, -1, np.int64), "confidence": np.full(n, np.nan, np.float32),
                   "macs": np.zeros(n, np.int64)}
        if good.size:
            predicted = result_columns(batch["path"][good], self.engine.predict(batch["image"][good]), self.names)
            for name, values in columns.items():
                values[good] = predicted[name]
        return {"path": batch["path"], "error": batch["error"], **columns}


def _cpu_share(cluster_cpus: float, actors: int) -> float:
    """CPUs each actor, and each read-and-decode task, asks for: a whole one where the cluster has one
    for every actor and one more for reading, else an even share of those, so that every actor and at
    least one reading task fit at once (two actors on `ray.init(num_cpus=2)`: 0.66 each)."""
    return min(1.0, np.floor(100 * cluster_cpus / (actors + 1)) / 100)


def _dataset(group: _Group, data, share: float, batch_size: int):
    import ray

    if group.kind == "images":
        ds = ray.data.read_binary_files(list(group.paths), include_paths=True, num_cpus=share)
        image_column = "bytes"
    else:
        # without a path column, the file's path (include_paths), numbered by row in the driver
        ds = ray.data.read_parquet(list(group.paths), include_paths=not group.has_path, num_cpus=share)
        ds = ds.select_columns([group.image_column, "path"])
        image_column = group.image_column
    return ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy", num_cpus=share,
                          fn_kwargs={"image_column": image_column, "numbered": group.numbered, "data": data})


@contextlib.contextmanager
def _ray_connection(address: str | None):
    """Ray, initialised: the instance this process already holds (left running), else the cluster at
    `address`, else a new local instance of this machine's CPUs; the last two are let go after."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise CommandError(f"cannot start Ray{f' at {address}' if address else ''}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def predict_on_ray(args, config, tensors, thresholds, policy, data) -> None:
    """`dvt predict --ray`: every input's images classified by a pool of at most --actors actors, the rows
    streamed into the parquet file --out, in input order; images are read and labelled as the weights' data
    config `data` says."""
    require("ray")
    require("pyarrow")
    groups = input_groups(args.images)
    names = data.class_names
    with _ray_connection(args.ray_address) as ray:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        actors = args.actors or max(1, int(cpus) - 1)
        share = _cpu_share(cpus, actors)
        batch_size = args.batch_size or 256
        tensors_ref = ray.put(tensors)
        predictor_args = (args.backend, config, tensors_ref, thresholds, args.onnx_dir, args.precision, policy.name,
                          names, os.environ.get("GLOG_v"))
        rows, exits, macs = 0, np.zeros(config.num_exits, np.int64), 0
        with results_writer(args.out) as write:
            for group in groups:
                ds = _dataset(group, data, share, batch_size).map_batches(
                    _Predictor, fn_constructor_args=predictor_args, batch_size=batch_size, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=share,
                )
                # rows leave in input order, so rows of a parquet file without paths can be numbered here
                ds.context.execution_options.preserve_order = True
                numbering = {}
                for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                    failed = next((e for e in batch["error"] if e), None)
                    if failed:
                        raise CommandError(failed)
                    if group.numbered:
                        batch["path"] = np.asarray([f"{p}#{_next(numbering, p)}" for p in batch["path"]], object)
                    rows += write(batch)
                    exits += np.bincount(batch["exit"][batch["exit"] >= 0], minlength=config.num_exits)
                    macs += int(batch["macs"].sum())
    undecided = rows - int(exits.sum())
    print(f"wrote {rows} rows to {args.out}: exits {exits.tolist()}"
          f"{f', {undecided} undecided' if undecided else ''}, "
          f"average {macs / max(rows, 1) / 1e9:.4f} GFLOPs per image, {policy.name} confidence, "
          f"{actors} actor{'s' if actors > 1 else ''} of {share:g} CPU")


def _next(counters: dict, key) -> int:
    counters[key] = counters.get(key, -1) + 1
    return counters[key]
