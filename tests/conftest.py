"""The `backend` fixture: every backend-parametrised test runs once per entry of tests.backends.BACKENDS."""
import pytest

from tests.backends import BACKENDS, adapter


@pytest.fixture(params=BACKENDS, ids=lambda cls: cls.name, scope="session")
def backend(request):
    """The process's one adapter of the backend (as `tests.backends.adapter` gives it): the stage graphs its
    engines compile are shared by every test."""
    return adapter(request.param.name)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the test session (2 CPUs; replicas and actors take fractions of them),
    shut down at its end. Yields its GCS address, which `dvt serve --ray-address` joins."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
