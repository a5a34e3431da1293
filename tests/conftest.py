import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MIRROR_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def bundled():
    """The real bundled model (SmolLM2-135M-Instruct), loaded once per test session."""
    from mirror.models import load_model

    return load_model()
