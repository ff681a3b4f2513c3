"""kcengine.bench.recovery: the --runs syntax and the mixed-plan allocation."""
import pytest

from kcengine.bench.recovery import mixed_plan, parse_runs


def test_parse_runs():
    assert parse_runs("0.75:centroids:8:0.002;mixed:centroids;0.5:frozen::0.01") == [
        ("ratio 0.75", "centroids", 8, 0.002), ("mixed (0.5 budget)", "centroids", None, None),
        ("ratio 0.5", "frozen", None, 0.01)]
    with pytest.raises(ValueError, match="'0.5' is not PLAN:MODE"):
        parse_runs("0.5")


class _Sweep:  # the two methods mixed_plan reads from a SensitivityResult
    def __init__(self, table):
        self.table = table

    def layers(self):
        return list(self.table)

    def layer_rows(self, name):
        return [{"k": k, "accuracy": a} for k, a in self.table[name].items()]


def test_mixed_plan_lowers_the_cheapest_layer_first():
    # Layer a loses nothing from 8 to 4 filters; b loses 10 points: a budget of 12 takes a down.
    sweep = _Sweep({"a": {4: 0.9, 8: 0.9}, "b": {4: 0.8, 8: 0.9}})
    assert mixed_plan(sweep, 12) == {"a": 4, "b": 8}
    assert mixed_plan(sweep, 16) == {"a": 8, "b": 8}
    assert mixed_plan(sweep, 8) == {"a": 4, "b": 4}
