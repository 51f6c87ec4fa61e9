"""The `backend` fixture: every backend-parametrised test runs once per entry of tests.backends.BACKENDS."""
import pytest

from tests.backends import BACKENDS


@pytest.fixture(params=BACKENDS, ids=lambda adapter: adapter.name, scope="session")
def backend(request):
    return request.param()
