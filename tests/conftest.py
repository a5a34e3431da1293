import os

import pytest
import torch

# The suite runs on two pytest-xdist workers (pyproject addopts): one torch thread each, so the
# two workers share the cores instead of oversubscribing them; two threads when run serially.
_DEFAULT_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("MIRROR_TEST_THREADS", _DEFAULT_THREADS)))


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
