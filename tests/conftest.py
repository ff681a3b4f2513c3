"""Shared fixtures: the read-only data folder beside the repository (``../shared/data``), and the
instruction-set copies of the native code this CPU can run."""
import pytest

from kcengine.bench.common import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$KCENGINE_DATA``); the test is skipped when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (real CIFAR-10 sample and checkpoints) is absent; set KCENGINE_DATA to run this")
    return path


@pytest.fixture(scope="session")
def runnable_isas():
    """The instruction sets whose native copies this CPU can run ("generic" always), probed by setting
    ``KCENGINE_CPU_ISA`` to each: the native side refuses a set the CPU lacks with ValueError."""
    from kcengine import _core

    out = []
    for isa in ("generic", "avx2", "avx512"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KCENGINE_CPU_ISA", isa)
            try:
                _core.kmeans_isa()
            except ValueError:
                continue
        out.append(isa)
    return out
