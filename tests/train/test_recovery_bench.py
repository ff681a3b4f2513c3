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
