"""Fixtures for tests/ and parity_tests/ alike."""
import sys

import pytest


@pytest.fixture(autouse=True)
def _mindspore_mode_restored():
    """MindSpore's execution mode is process-global; a test that switches to graph mode must not leak it."""
    yield
    if "mindspore" in sys.modules:
        import mindspore as ms

        if ms.get_context("mode") != ms.PYNATIVE_MODE:
            ms.set_context(mode=ms.PYNATIVE_MODE)
