"""The results file of `dvt predict --out` (one parquet file, one row per image), written the same way with or
without Ray: its columns, and a writer that replaces the file atomically when the run completes."""
from __future__ import annotations

import contextlib

import numpy as np

from .options import CommandError

# Columns of the results file, in order: (name, pyarrow type name).
RESULT_COLUMNS = (("path", "string"), ("class_index", "int64"), ("label", "string"), ("exit", "int64"),
                  ("confidence", "float32"), ("macs", "int64"))


def require(module: str) -> None:
    """CommandError naming the extra that installs `module` (ray, pyarrow) where it is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise CommandError(f"dvt predict --ray and --out need {module}, which is not installed: "
                           "pip install -e '.[serve]'")


def result_schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in RESULT_COLUMNS])


def result_columns(paths, prediction, names) -> dict[str, np.ndarray]:
    """The results' columns for `paths` and the engine's `prediction` of them: the class index, its
    label (the class name where `names` are known, else the index, as `dvt predict` prints it), the exit
    (-1: undecided), the confidence under the engine's exit policy and the multiply-adds spent."""
    classes = np.asarray(prediction.classes, dtype=np.int64)
    return {
        "path": np.asarray(paths, dtype=object),
        "class_index": classes,
        "label": np.asarray([names[c] if names else str(c) for c in classes], dtype=object),
        "exit": np.asarray(prediction.exit_index, dtype=np.int64),
        "confidence": np.asarray(prediction.confidence, dtype=np.float32),
        "macs": np.asarray(prediction.macs, dtype=np.int64),
    }


@contextlib.contextmanager
def results_writer(out: str):
    """A function that appends a batch of result columns to the parquet file that replaces `out`
    (atomically) when the block completes; on an error `out` is left as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dvt_shared.io_utils import atomic_path

    schema = result_schema()
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        def write(columns) -> int:
            table = pa.table({name: columns[name] for name in schema.names}).cast(schema)
            writer.write_table(table)
            return table.num_rows

        yield write


def write_results(out: str, columns: dict[str, np.ndarray]) -> None:
    """`dvt predict --out` without --ray: the same rows in one parquet file."""
    require("pyarrow")
    with results_writer(out) as write:
        write(columns)
