"""Shared fixtures: the read-only data folder beside the repository (``../shared/data``), and the
instruction-set copies of the native code this CPU can run."""
import os

import pytest
from hypothesis import settings

from kcengine.bench.common import runnable_isas as _runnable_isas
from kcengine.bench.common import shared_data_dir

# The fuzz tests draw the same cases on every run (derandomize), so a green run on one machine is green on
# CI's clean clone: a new random case that finds a fault fails a developer's explicit exploration, not a
# landing.  KCENGINE_FUZZ=random draws fresh cases (and keeps Hypothesis's example database) for exploring.
settings.register_profile("kcengine-fixed", derandomize=True, database=None)
settings.register_profile("kcengine-random")
settings.load_profile("kcengine-random" if os.environ.get("KCENGINE_FUZZ") == "random" else "kcengine-fixed")


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$KCENGINE_DATA``); the test is skipped when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (real CIFAR-10 sample and checkpoints) is absent; set KCENGINE_DATA to run this")
    return path


@pytest.fixture(scope="session")
def runnable_isas():
    """The instruction sets whose native copies this CPU can run ("generic" always; see
    :func:`kcengine.bench.common.runnable_isas`)."""
    return _runnable_isas()
