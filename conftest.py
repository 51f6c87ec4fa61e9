"""Fixtures for tests/ and parity_tests/ alike."""
import gc
import os
import sys

import pytest
from hypothesis import settings

# `make test` and CI replay the same examples every run (derandomized, no example database);
# `make test-explore` draws new ones. A test's own @settings still sets its example count.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _mindspore_mode_restored():
    """MindSpore's execution mode is process-global; a test that switches to graph mode must not leak it."""
    yield
    if "mindspore" in sys.modules:
        import mindspore as ms

        if ms.get_context("mode") != ms.PYNATIVE_MODE:
            ms.set_context(mode=ms.PYNATIVE_MODE)


def pytest_collection_finish(session):
    """Everything imported so far (the frameworks, the test modules) lives as long as the process: frozen out
    of the garbage collector, it is not walked again by the full collection MindSpore runs before every graph
    compile: tests/test_engine.py's six MindSpore stage compiles took 58 s unfrozen, 40 s frozen, after
    collecting every test."""
    gc.collect()
    gc.freeze()
