"""kcengine.bench.recovery: the --runs syntax (the mixed plan's allocation is tested in test_sensitivity)."""
import pytest

from kcengine.bench.recovery import _format_runs, parse_runs, parse_set


def test_parse_runs():
    assert parse_runs("0.75:centroids:8:0.002;mixed:centroids;0.5:frozen::0.01") == [
        ("ratio 0.75", "centroids", 8, 0.002), ("mixed (0.5 budget)", "centroids", None, None),
        ("ratio 0.5", "frozen", None, 0.01)]
    with pytest.raises(ValueError, match="'0.5' is not PLAN:MODE"):
        parse_runs("0.5")


def test_parse_set():
    assert parse_set(["feature_weight=0", "schedule=cosine", "lr=2e-3"]) == {
        "feature_weight": 0, "schedule": "cosine", "lr": 0.002}
    with pytest.raises(ValueError, match="'oops' is not KEY=VALUE"):
        parse_set(["oops"])


def test_format_runs_reads_back():
    text = "0.75:centroids:8:0.002;mixed:centroids;0.5:frozen::0.01"
    assert _format_runs(parse_runs(text)) == text


def test_seed_summary_mean_and_range_per_plan():
    from kcengine.bench.recovery import _seed_summary

    rows = [{"plan": "ratio 0.5", "step": "refit", "mode": "", "top1": 0.7},
            {"plan": "ratio 0.5", "step": "finetune", "mode": "centroids", "top1": 0.86},
            {"plan": "ratio 0.5", "step": "finetune", "mode": "centroids", "top1": 0.88},
            {"plan": "mixed (0.5 budget)", "step": "finetune", "mode": "centroids", "top1": 0.9}]
    text = _seed_summary(rows)
    assert "- ratio 0.5, centroids: mean 87.0%, range 86.0-88.0% over 2 seeds" in text
    assert "- mixed (0.5 budget), centroids: mean 90.0%, range 90.0-90.0% over 1 seed\n" in text


def test_seeds_and_a_seed_option_conflict(tmp_path):
    from kcengine.bench.recovery import run

    with pytest.raises(ValueError, match="seeds= or finetune_options"):
        run(out_dir=tmp_path, seeds=[0, 1], finetune_options={"seed": 3})


def test_stage_options_reach_the_progressive_runs_only():
    """`--set stage_epochs=2` applies to every run; finetune refuses stage options outside progressive mode, so
    the centroids run that opens the default runs raised after the baseline and the clustering."""
    from kcengine.bench.recovery import run_options

    ft = {"stage_epochs": 2, "stage_training": "freeze", "order": ["layer3"], "feature_weight": 0}
    assert run_options(ft, "centroids", 1) == {"feature_weight": 0, "seed": 1}
    assert run_options(ft, "progressive", None) == ft
