import os

import pytest
import torch

# The suite runs on two pytest-xdist workers (pyproject addopts): one torch thread each, so the
# two workers share the cores instead of oversubscribing them; two threads when run serially.
_DEFAULT_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("MIRROR_TEST_THREADS", _DEFAULT_THREADS)))


@pytest.fixture(autouse=True)
def _grouped_on_one_worker(request):
    """Tests marked xdist_group("ray") start Ray runtimes (two workers' actors each, ~5 GB): two
    at once on the two xdist workers overrun a 24 GiB machine (Ray's OOM killer then kills
    actors). pytest 9.2 silently broke --dist loadgroup (pytest-dev/pytest-xdist#1386; the test
    extra pins pytest < 9.2): fail loudly rather than run them concurrently."""
    if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getoption("dist", None) == "loadgroup":
        for mark in request.node.iter_markers("xdist_group"):
            name = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
            assert request.node.nodeid.endswith(f"@{name}"), (
                f"pytest-xdist did not group {request.node.nodeid} with the other {name!r} tests "
                f"(pytest {pytest.__version__}; see tests/conftest.py)")


@pytest.fixture(scope="session")
def bundled():
    """The real bundled model (SmolLM2-135M-Instruct), loaded once per test session."""
    from mirror.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def local_target(bundled):
    """The target the embedded deployment runs (and `mirror generate --inprocess`, `mirror serve`):
    the bundled model on `DeploymentConfig.local()`'s target backend, 'auto' resolved here - the
    reference for exactness tests of those paths."""
    from mirror.runtime.config import DeploymentConfig

    if DeploymentConfig.local().target.resolve_backend() == "onnx":
        from mirror.models.ort_target import OrtTarget

        return OrtTarget(bundled.model)
    return bundled.model
