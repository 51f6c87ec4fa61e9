"""Every serving default lives in `dvt_serve.spec.ServeSpec`: the command's options and the batcher read it."""
import dataclasses
import inspect

from dvt_cli import build_parser
from dvt_serve.batching import StageBatcher
from dvt_serve.spec import ServeSpec, serve_default

# ServeSpec fields a `dvt serve` option sets (field -> option), written out by hand.
OPTIONS = {"backend": "--backend", "precision": "--precision", "max_batch": "--max-batch",
           "max_wait_ms": "--max-wait-ms", "max_queue": "--max-queue", "batching": "--batching",
           "max_body": "--max-body", "threads": "--threads"}


def test_the_commands_defaults_are_the_specs():
    args = build_parser().parse_args(["serve", "--weights", "w.safetensors"])
    fields = {f.name: f.default for f in dataclasses.fields(ServeSpec)}
    for field, option in OPTIONS.items():
        assert getattr(args, option[2:].replace("-", "_")) == fields[field] == serve_default(field), option


def test_the_batchers_defaults_are_the_specs():
    parameters = inspect.signature(StageBatcher).parameters
    assert parameters["max_batch"].default == serve_default("max_batch")
    assert parameters["max_queue"].default == serve_default("max_queue")
    assert parameters["batching"].default == serve_default("batching")
    assert parameters["max_wait_s"].default * 1e3 == serve_default("max_wait_ms")
