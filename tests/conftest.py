"""Shared fixtures: the read-only data folder beside the repository (``../shared/data``)."""
import pytest

from kcengine.bench.common import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$KCENGINE_DATA``); the test is skipped when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (real CIFAR-10 sample and checkpoints) is absent; set KCENGINE_DATA to run this")
    return path
