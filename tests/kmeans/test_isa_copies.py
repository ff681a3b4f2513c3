"""The solver is compiled three times (generic, avx2, avx512) and one copy is picked at run time
(env KCENGINE_CPU_ISA overrides).  Every copy this CPU can run must give Lloyd's labels: the
copies differ in their vector code (e.g. topm's AVX2/AVX-512 compare masks against the generic copy's
scalar loop)."""
import numpy as np
import pytest

import kcengine
from kcengine import _core


@pytest.mark.parametrize("algorithm,n", [("topm", 6000), ("topm", 9000),  # top-m lists 2 / 4 competitors
                                         ("yinyang", 6000), ("hamerly", 6000)])
def test_every_runnable_copy_gives_lloyds_labels(monkeypatch, algorithm, n, runnable_isas):
    isas = runnable_isas
    assert "generic" in isas and _core.kmeans_isa() in isas
    x = np.random.default_rng(0).uniform(-1, 1, size=(n, 9)).astype(np.float32)
    init = x[:64].copy()
    ref = kcengine.kmeans(x, 64, init=init, algorithm="lloyd")
    for isa in isas:
        monkeypatch.setenv("KCENGINE_CPU_ISA", isa)
        got = kcengine.kmeans(x, 64, init=init, algorithm=algorithm)
        np.testing.assert_array_equal(got.labels, ref.labels, err_msg=isa)
        assert int(got.n_iter) == int(ref.n_iter), isa


def test_unknown_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KCENGINE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="KCENGINE_CPU_ISA must be generic, avx2 or avx512, got 'sse9'"):
        kcengine.kmeans(np.zeros((4, 2), np.float32), 2)


@pytest.mark.parametrize("n", [1001, 773, 820])
@pytest.mark.parametrize("d,weighted", [(9, False), (9, True), (5, False), (5, True)])
def test_every_runnable_copy_seeds_like_the_generic_copy(monkeypatch, n, d, weighted, runnable_isas):
    """k-means++'s vector sweeps (the 9-D trial and winner passes, the low-D pass with and without
    weights; last blocks of 1001 % 256 = 233, 773 % 256 = 5 and 820 % 256 = 52 points, so 16-lane tails
    that end in either 8-lane half, and on AVX2 runs of 32 points followed by 1 to 20 more) against the
    generic copy's scalar loops: the same seeds, so the same
    clustering.  The generic copy rounds without FMA, so this holds for data whose trial potentials
    are not within float rounding of each other, as here."""
    if runnable_isas == ["generic"]:
        pytest.skip("this CPU runs only the generic copy: nothing to compare it with")
    rng = np.random.default_rng(d)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=len(x)) if weighted else None
    monkeypatch.setenv("KCENGINE_CPU_ISA", "generic")
    ref = kcengine.kmeans(x, 40, seed=5, sample_weight=w)
    for isa in runnable_isas:
        monkeypatch.setenv("KCENGINE_CPU_ISA", isa)
        got = kcengine.kmeans(x, 40, seed=5, sample_weight=w)
        np.testing.assert_array_equal(got.labels, ref.labels, err_msg=isa)
        np.testing.assert_allclose(got.centroids, ref.centroids, rtol=1e-5, atol=1e-6, err_msg=isa)
