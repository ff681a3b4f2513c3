"""kcengine.bench.compile's parent side: the rounds, the pairing of variants and the report. (A real run
compiles four models with inductor per process, minutes on two cores: the children are stubbed here.)"""
import json
import subprocess
import sys

from kcengine.bench import compile as cb


def _stub_children(monkeypatch, times):
    """subprocess.run replaced: the child for (variant, round) prints one JSON line per model from ``times``."""
    calls = []

    def fake_run(cmd, capture_output, text, check):
        assert cmd[:3] == [sys.executable, "-m", "kcengine.bench.compile"] and capture_output and text and check
        variant = cmd[cmd.index("--child") + 1]
        rnd = sum(1 for c in calls if c == variant)
        calls.append(variant)
        lines = [json.dumps({"model": model, "fused": fused, "variant": variant, "eager_ms": e, "compiled_ms": c,
                             "compile_s": 1.0})
                 for (model, fused, v, r), (e, c) in times.items() if v == variant and r == rnd]
        return subprocess.CompletedProcess(cmd, 0, stdout="\n".join(lines) + "\n", stderr="")

    monkeypatch.setattr(cb.subprocess, "run", fake_run)
    return calls


def test_run_alternates_variants_and_keeps_each_variants_best_round(monkeypatch, tmp_path):
    times = {  # (model, fused, variant, round) -> (eager ms, compiled ms)
        ("filter", False, "op", 0): (10.0, 8.0), ("filter", False, "op", 1): (12.0, 6.0),  # best: round 1, 0.5
        ("filter", False, "torch_ops", 0): (10.0, 12.0), ("filter", False, "torch_ops", 1): (9.0, 9.9),  # 1.1
        ("filter", True, "op", 0): (5.0, 4.0), ("filter", True, "op", 1): (5.0, 4.5),  # round 0, 0.8
        ("filter", True, "torch_ops", 0): (5.0, 5.0), ("filter", True, "torch_ops", 1): (6.0, 9.0),  # round 0, 1.0
    }
    calls = _stub_children(monkeypatch, times)
    rows = cb.run("resnet20", batch=1, size=32, rounds=2, repeat=3, progress=lambda s: None)
    assert calls == ["op", "torch_ops", "op", "torch_ops"]
    by = {(r["layers"], r["fused"]): r for r in rows}
    assert set(by) == {("filter", "no"), ("filter", "yes")}
    r = by[("filter", "no")]
    assert (r["eager ms"], r["compiled ms (native op)"], r["compiled / eager (native op)"]) == (12.0, 6.0, 0.5)
    assert (r["eager ms (other process)"], r["compiled ms (torch ops)"]) == (9.0, 9.9)
    assert abs(r["compiled / eager (torch ops)"] - 1.1) < 1e-12
    assert by[("filter", "yes")]["compiled / eager (native op)"] == 0.8
    assert by[("filter", "yes")]["compiled / eager (torch ops)"] == 1.0
    path = cb.write_report(rows, tmp_path, "compile_test", "python -m kcengine.bench.compile --model resnet20",
                           "resnet20", 1, 32)
    text = path.read_text()
    assert text.startswith("# torch.compile of clustered resnet20 on the CPU")  # the model asked for
    assert "- input: batch 1 at 32x32" in text and "- recorded by `python -m kcengine.bench.compile" in text
    assert "| filter | no | 12.00 | 6.00 | 0.5 | 9.00 | 9.90 | 1.10 |" in text
    assert (tmp_path / "compile_test.csv").read_text().count("\n") == 3  # header and two rows
