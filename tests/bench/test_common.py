"""kcengine.bench.common helpers that the benchmarks and the test fixtures share."""
import os
from pathlib import Path

import pytest

from kcengine import _core
from kcengine.bench.common import forced_isa, runnable_isas


def test_runnable_isas_asks_the_native_side_and_restores_the_env(monkeypatch):
    monkeypatch.delenv("KCENGINE_CPU_ISA", raising=False)
    best = _core.kmeans_isa()  # the native pick: the best set the CPU runs
    isas = runnable_isas()
    assert isas[0] == "generic" and isas[-1] == best
    assert isas == [i for i in ("generic", "avx2", "avx512") if i in isas]  # in order, no repeats
    assert "KCENGINE_CPU_ISA" not in os.environ  # unset before, unset after
    monkeypatch.setenv("KCENGINE_CPU_ISA", "generic")
    assert runnable_isas() == isas and os.environ["KCENGINE_CPU_ISA"] == "generic"
    assert _core.kmeans_isa() == "generic"  # the forced set still holds


def test_forced_isa_restores_set_and_unset(monkeypatch):
    monkeypatch.delenv("KCENGINE_CPU_ISA", raising=False)
    with forced_isa("generic"):
        assert _core.kmeans_isa() == "generic"
        os.environ["KCENGINE_CPU_ISA"] = "avx2"  # the block may change it again
    assert "KCENGINE_CPU_ISA" not in os.environ
    monkeypatch.setenv("KCENGINE_CPU_ISA", "generic")
    with pytest.raises(RuntimeError, match="left by an error"):  # the error passes through, the value returns
        with forced_isa("avx2"):
            os.environ["KCENGINE_CPU_ISA"] = "no-such-set"
            raise RuntimeError("left by an error")
    assert os.environ["KCENGINE_CPU_ISA"] == "generic"
    with forced_isa():
        assert os.environ["KCENGINE_CPU_ISA"] == "generic"  # None leaves the value in force


def test_runnable_isas_leaves_out_a_refused_set(monkeypatch):
    real = _core.kmeans_isa

    def refusing():  # as the native side does for a set this CPU lacks
        if os.environ.get("KCENGINE_CPU_ISA") == "avx2":
            raise ValueError("KCENGINE_CPU_ISA=avx2 but this CPU lacks it")
        return real()

    monkeypatch.setattr(_core, "kmeans_isa", refusing)
    assert runnable_isas()[0] == "generic" and "avx2" not in runnable_isas()


def test_time_alternating_runs_its_rounds_in_turn_and_more_for_min_seconds():
    """Every round calls each function once, in turn (reversed every other round with flip); repeat rounds at
    least, and more until min_seconds have passed; each result is that function's best call."""
    import time

    from kcengine.bench.common import time_alternating

    calls = []

    def fn(name, seconds):
        def f():
            calls.append(name)
            time.sleep(seconds)
        return f

    best = time_alternating((fn("a", 0.002), fn("b", 0.0)), 3, warmup=1, flip=True)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds 0 (a b), 1 (b a), 2 (a b)
    assert best[0] >= 0.002 and best[1] < best[0]
    calls.clear()
    t0 = time.perf_counter()
    time_alternating((fn("a", 0.001),), 2, warmup=0, min_seconds=0.05)
    assert time.perf_counter() - t0 >= 0.05 and 2 < len(calls) <= 1000


def test_cpu_model_names_family_and_model():
    """Records name the CPU generation, not only the vendor line a shared machine reports."""
    from kcengine.bench.common import _cpu_model

    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
            "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: other\n")
    assert _cpu_model(info) == "AMD EPYC, family 25 model 17"
    assert _cpu_model("model name\t: Some CPU\n") == "Some CPU"
    assert _cpu_model()  # this machine: something, whatever it reports


def test_shown_path_prints_no_absolute_path_of_this_machine(tmp_path):
    """Reports name data folders relative to the checkout's parent (../shared/...), else by their last two parts."""
    from kcengine.bench.common import repo_root, shown_path

    root = repo_root()
    if root is not None:
        inside = root.parent / "shared" / "data" / "cifar-10-batches-py"
        assert shown_path(inside) == "../shared/data/cifar-10-batches-py"
    outside = tmp_path / "some" / "cifar"
    base = (root or Path.cwd()).resolve().parent
    if base not in outside.resolve().parents:  # a checkout beside pytest's temporary folders shows it from there
        assert shown_path(outside) == "some/cifar"
    assert not shown_path(outside).startswith("/")
