"""tools/readme_bench.py: the README's benchmark section is what bench/results holds, and the tool
reads the lines the recovery bench writes (it is plain stdlib and cannot import kcengine's strings)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("readme_bench", ROOT / "tools" / "readme_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_benchmark_section_matches_the_recorded_results():
    assert _tool().main(["--check"]) == 0, "run python tools/readme_bench.py after re-recording"


def test_check_mode_notices_a_stale_readme(tmp_path, monkeypatch):
    tool = _tool()
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("<!-- bench:end -->", "stale\n<!-- bench:end -->"))
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    (tmp_path / "bench").symlink_to(ROOT / "bench")
    assert tool.main(["--check"]) == 1
    assert tool.main([]) == 0 and tool.main(["--check"]) == 0  # rewritten: now in step
    assert tool.main(["--bogus"]) == 2


def test_seed_summary_reads_what_the_recovery_bench_writes(tmp_path):
    from kcengine.bench.recovery import _seed_summary

    rows = [{"step": "finetune", "plan": "ratio 0.5", "mode": "centroids", "top1": v} for v in (0.879, 0.872)]
    rows.append({"step": "refit", "plan": "ratio 0.5", "mode": "", "top1": 0.765})
    path = tmp_path / "recovery.md"
    path.write_text("# Recovery\n\n| plan | top1 |\n|---|---|\n| ratio 0.5 | 0.879 |\n" + _seed_summary(rows))
    assert _tool().seed_summary(path).splitlines() == [
        "- ratio 0.5, centroids: mean 87.5%, range 87.2-87.9% over 2 seeds"]
