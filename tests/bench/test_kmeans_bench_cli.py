"""The k-means benchmark's own CLI (``python -m kcengine.bench.kmeans``): argument handling and its timing loop; the
workloads themselves are exercised by ``kcengine bench --quick`` (tests/commands)."""
import pytest

from kcengine.bench import kmeans as kb


@pytest.fixture
def captured(monkeypatch, tmp_path):
    calls = []

    def fake_run(model, **kw):
        calls.append((model, kw))
        return {"source": "fake", "workloads": [], "rows": [], "peak_rss_mb_before": 0.0}

    monkeypatch.setattr(kb, "run_clustering_bench", fake_run)
    monkeypatch.setattr(kb, "kcengine_peak_memory", lambda model, workload: {"peak_mb": 0.0})
    def fake_report(results, out, name, command):
        calls.append(("report", command))
        return out / f"{name}.md"

    monkeypatch.setattr(kb, "write_report", fake_report)
    return calls


def test_large_model_defaults_to_the_recorded_cap(captured, capsys, tmp_path):
    # resnet18's 4,780 a_sweep problems with scikit-learn and the torch reference would run for hours
    assert kb.main(["--model", "resnet18", "--out", str(tmp_path)]) == 0
    assert captured[0][1]["max_problems"] == {"a_sweep": 48, "d_element": 4000}
    assert "--max-problems all" in capsys.readouterr().out


@pytest.mark.parametrize("arg, want", [("all", None), ("7", 7),
                                       ("a_sweep=3,d_element=5", {"a_sweep": 3, "d_element": 5})])
def test_explicit_cap_is_kept(captured, tmp_path, arg, want):
    assert kb.main(["--model", "resnet18", "--max-problems", arg, "--out", str(tmp_path)]) == 0
    assert captured[0][1]["max_problems"] == want


def test_resnet20_is_not_capped(captured, tmp_path):
    assert kb.main(["--out", str(tmp_path)]) == 0
    assert captured[0][1]["max_problems"] is None


def test_report_names_its_command(captured, tmp_path, monkeypatch):
    monkeypatch.setattr(kb, "set_threads", lambda n: None)  # this process's thread count stays as it is
    assert kb.main(["--out", str(tmp_path), "--threads", "1", "--name", "one"]) == 0
    assert captured[-1] == ("report", f"python -m kcengine.bench.kmeans --out {tmp_path} --threads 1 --name one")


def test_isa_report_names_its_command(monkeypatch, tmp_path):
    seen = {}

    def fake(model, out_dir, command, name):
        seen.update(c=command, name=name)
        return out_dir

    monkeypatch.setattr(kb, "isa_comparison", fake)
    assert kb.main(["--isa", "--out", str(tmp_path)]) == 0
    assert seen == {"c": f"python -m kcengine.bench.kmeans --isa --out {tmp_path}", "name": "kmeans_isa"}
    assert kb.main(["--isa", "--out", str(tmp_path), "--name", "isa_here"]) == 0
    assert seen["name"] == "isa_here"


def test_time_methods_repeats_only_the_quick_calls_and_keeps_the_best(monkeypatch):
    """min_seconds: a method whose calls add up to less runs again (alternating, at most max_repeat calls);
    a slow one runs once; a failing one is called once and reported.  The clock is faked: each call of a
    method takes its listed durations in turn."""
    durations = {"quick": [0.05, 0.02, 0.04, 0.03, 0.06, 0.01], "slow": [2.0, 1.0], "broken": []}
    now, order = [0.0], []
    monkeypatch.setattr(kb.time, "perf_counter", lambda: now[0])

    def fn(m):
        def run():
            order.append(m)
            if m == "broken":
                raise RuntimeError("no")
            now[0] += durations[m][sum(o == m for o in order) - 1]
            return m
        return run

    methods = ["quick", "slow", "broken"]
    calls = {}
    times, outs, errors = kb.time_methods("w", {m: fn(m) for m in methods}, methods, min_seconds=0.5, max_repeat=5,
                                          calls=calls)
    assert order == ["quick", "slow", "broken"] + ["quick"] * 4
    assert calls == {"quick": 5, "slow": 1, "broken": 0}
    assert times == pytest.approx({"quick": 0.02, "slow": 2.0, "broken": float("inf")})
    assert outs == {"quick": "quick", "slow": "slow"} and set(errors) == {"broken"}
    order.clear()
    times, _, _ = kb.time_methods("w", {m: fn(m) for m in methods[:2]}, methods[:2], repeat=2)
    assert order == ["quick", "slow", "slow", "quick"]  # no min_seconds: the repeats only, order alternating


def test_inertia_ratio_counts_problems_every_method_solves_exactly():
    """k = N: every method reaches inertia 0, and the ratio says they are equal (it read NaN, shown as
    `inertia xnan` in `kcengine bench --model resnet20 --quick`, whose c_kernels problems all have k = N)."""
    import numpy as np

    from kcengine.bench.kmeans import Workload, _geo_ratio, run_workload

    assert _geo_ratio([0.0, 0.0], [0.0, 0.0]) == 1.0
    assert abs(_geo_ratio([2.0, 0.0], [1.0, 0.0]) - 2 ** 0.5) < 1e-12  # the zero pair counts as 1
    assert _geo_ratio([1.0], [0.0]) != _geo_ratio([1.0], [0.0])  # only the reference at 0: no ratio (NaN)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 9)).astype(np.float32)
    rows = run_workload(Workload("c_kernels", [x, x[:20]], [48, 20]), ["kcengine", "sklearn"])
    assert [r.inertia_ratio for r in rows] == [1.0, 1.0]


def test_a_real_run_writes_a_self_consistent_record(tmp_path):
    """The recording path for real, on two problems per workload: the report's header, each workload's
    rows, speed-ups that are the ratio of the seconds beside them, and the memory line, measured in a
    child process that calls the native core alone (its positional call breaks silently if the core's
    signature changes: the line would just be missing)."""
    import csv
    import re

    assert kb.main(["--max-problems", "2", "--methods", "kcengine,sklearn", "--workloads", "b_filters,c_kernels",
                    "--out", str(tmp_path), "--name", "t"]) == 0
    md = (tmp_path / "t.md").read_text()
    for head in ("- date: ", "- commit: ", "- recorded by `python -m kcengine.bench.kmeans --max-problems 2",
                 "- machine: ", "- kcengine solver build: "):
        assert head in md
    mem = re.search(r"peaks at (\d+) MB during the k-means call, ([\d.]+) MB above its peak before the call "
                    r"\(budget: 2 x input \+ 200 MB = (\d+) MB\)", md)
    assert mem and float(mem.group(2)) <= float(mem.group(3))
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["workload"], r["method"]) for r in rows) == [
        ("b_filters", "kcengine"), ("b_filters", "sklearn"), ("c_kernels", "kcengine"), ("c_kernels", "sklearn")]
    for wl in ("b_filters", "c_kernels"):
        by = {r["method"]: r for r in rows if r["workload"] == wl}
        assert by["kcengine"]["problems"] == "2"
        want = float(by["sklearn"]["seconds"]) / float(by["kcengine"]["seconds"])
        assert float(by["kcengine"]["x vs sklearn"]) == pytest.approx(want, rel=1e-6)
        assert float(by["sklearn"]["inertia / sklearn"]) == 1.0
        assert 0.9 < float(by["kcengine"]["inertia / sklearn"]) < 1.1
