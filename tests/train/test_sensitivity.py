"""Output sensitivity (KL after refit, each layer alone) and the budgeted per-layer k allocation."""
import itertools
import math

import pytest
import torch

import kcengine
from kcengine.train.calibrate import calibrate_outputs
from kcengine.data.datasets import evenly_spaced, make_loader
from kcengine.train.sensitivity import allocate_ks, output_sensitivity, sensitivity_plan


def test_output_sensitivity_rows_are_the_kl_of_each_layer_clustered_alone(kit):
    torch.manual_seed(0)
    model = kit.TinyNet().eval()
    ds = kit.tiny_data(n=64)
    calib, ev = ds.images[:32], ds.images[32:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = output_sensitivity(model, calib, ev, ratios=(0.25, 0.5, 1.0))
    assert [(r["layer"], r["k"]) for r in rows] == [("conv1", 2), ("conv1", 4), ("conv2", 3), ("conv2", 6)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # not modified
    # independent re-computation of one row: cluster, refit, KL by its definition
    cm, _ = kcengine.compress(model, {"layers": {"conv2": 3}}, layers=["conv2"], seed=0)
    cm.eval()
    calibrate_outputs(cm, model, calib, layers=["conv2"], seed=0)
    with torch.no_grad():
        p, q = torch.softmax(model(ev), 1), torch.softmax(cm(ev), 1)
    ref = float((p * (p.log() - q.log())).sum(1).mean())
    assert rows[2]["kl"] == pytest.approx(ref, rel=1e-4, abs=1e-7)
    assert all(r["kl"] >= -1e-7 and 0 <= r["agreement"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="ratios"):
        output_sensitivity(model, calib, ev, ratios=(0.0,))
    with pytest.raises(ValueError, match="eval_images"):
        output_sensitivity(model, calib, ev[0])


def _rows(curves):
    return [{"layer": n, "out_channels": len(c) + 1, "k": k + 1, "kl": v} for n, c in curves.items()
            for k, v in enumerate(c)]


def test_allocate_ks_meets_the_budget_and_is_optimal_on_convex_curves():
    # convex decreasing curves (KL at k = 1..C-1; 0 at C): the relaxation is exact, so brute force agrees
    curves = {"a": [8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.1], "b": [3.0, 1.0, 0.3, 0.1, 0.05, 0.02, 0.01],
              "c": [20.0, 9.0, 4.0, 1.5, 0.5, 0.1, 0.0]}
    rows = _rows(curves)

    def cost(n, k):
        return 0.0 if k == len(curves[n]) + 1 else curves[n][k - 1]

    for budget in (6, 10, 13, 17, 24):
        ks = allocate_ks(rows, budget, min_ratio=0.0)
        assert sum(ks.values()) == budget
        best = min(sum(cost(n, k) for n, k in zip(curves, combo))
                   for combo in itertools.product(range(1, 9), repeat=3) if sum(combo) == budget)
        assert sum(cost(n, k) for n, k in ks.items()) == pytest.approx(best)


def test_allocate_ks_is_the_exact_minimum_on_curves_that_are_not_convex():
    # KL curves that fall slowly, then steeply (a split by marginal gains stops before the steep part): every
    # budget's allocation against brute force over all splits, with and without a floor
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        widths = [4, 6, 5]
        curves = {}
        for n, c in zip("abc", widths):
            kl = torch.rand(c - 1, generator=gen).double().sort(descending=True).values * 10
            if trial % 2 == 0:  # a plateau, then a cliff
                kl[: (c - 1) // 2] = kl[0]
            curves[n] = kl.tolist()
        rows = _rows(curves)
        for min_ratio in (0.0, 0.5):
            floors = [max(1, math.ceil(min_ratio * c)) for c in widths]

            def cost(n, k):
                c = widths["abc".index(n)]
                return 0.0 if k == c else curves[n][k - 1]

            for budget in range(sum(floors), sum(widths) + 2):
                ks = allocate_ks(rows, budget, min_ratio=min_ratio)
                if budget >= sum(widths):
                    assert ks == dict(zip("abc", widths))
                    continue
                assert sum(ks.values()) == budget
                assert all(f <= ks[n] <= c for n, f, c in zip("abc", floors, widths))
                best = min(sum(cost(n, k) for n, k in zip("abc", combo))
                           for combo in itertools.product(*(range(f, c + 1) for f, c in zip(floors, widths)))
                           if sum(combo) == budget)
                assert sum(cost(n, k) for n, k in ks.items()) == pytest.approx(best), (trial, min_ratio, budget)


def test_allocate_ks_floor_and_errors():
    rows = _rows({"a": [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "b": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]})
    ks = allocate_ks(rows, 10, min_ratio=0.5)
    assert ks["a"] >= 4 and sum(ks.values()) == 10
    assert allocate_ks(rows, 16) == {"a": 8, "b": 8}
    with pytest.raises(ValueError, match="budget"):
        allocate_ks(rows, 3, min_ratio=0.5)
    with pytest.raises(ValueError, match="min_ratio"):
        allocate_ks(rows, 10, min_ratio=math.nan)
    with pytest.raises(ValueError, match="rows"):
        allocate_ks([], 10)
    with pytest.raises(ValueError, match="rows must hold a finite 'kl'"):
        allocate_ks([dict(rows[0], kl=math.nan)] + rows[1:], 10)


@pytest.mark.parametrize("bad, match", [
    ({"k": 9}, "1 <= k < out_channels"),   # past the layer's width: the interpolation's points went out of order
    ({"k": 8}, "1 <= k < out_channels"),   # full width is the curve's own end
    ({"k": 0}, "1 <= k < out_channels"),
    ({"k": 2.5}, "1 <= k < out_channels"),
    ({"k": 2}, "at k=2 twice"),            # a second measurement of one k
    ({"out_channels": 16}, "disagree on out_channels"),
])
def test_allocate_ks_refuses_malformed_rows(bad, match):
    rows = _rows({"a": [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2], "b": [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]})
    with pytest.raises(ValueError, match=match):
        allocate_ks(rows + [dict(rows[0], kl=0.1, **bad)], 8)
    with pytest.raises(ValueError, match="'layer', 'out_channels', 'k'"):
        allocate_ks([{"layer": "a", "kl": 1.0}], 8)


class _SharedReluNet(torch.nn.Module):
    """A block whose one ReLU module runs before and after the target conv (in place), like torchvision's
    BasicBlock: the prefix cache must not serve the second call, nor let the in-place op touch what it stores."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6))
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv_a = torch.nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn_a = torch.nn.BatchNorm2d(6)
        self.conv_b = torch.nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn_b = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.bn_a(self.conv_a(x))
        y += 0.5  # in place on bn_a's output: must not reach the stored copy
        y = self.relu(y)
        y = self.relu(self.bn_b(self.conv_b(y)) + x.mean(1, keepdim=True))
        return self.head(y.mean((2, 3)))


def test_output_sensitivity_reuses_the_prefix_only_where_it_is_safe():
    """The clustered copies get the stored outputs of the modules that ran before the layer (the stem, and
    conv_a/bn_a before conv_b) but not of the ReLU called again after it; KL equals the whole-forward value."""
    from kcengine.train.sensitivity import _Prefix

    torch.manual_seed(0)
    model = _SharedReluNet().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(20, 3, 7, 7)
    calib, ev = images[:10], images[10:]
    starts = range(0, ev.shape[0], 4)
    prefix = _Prefix.record(model, "conv_b", ev, starts, 4)
    assert set(prefix.outputs) == {"stem", "conv_a", "bn_a"}  # not "relu": it runs again after conv_b
    assert all(len(v) == len(starts) for v in prefix.outputs.values())
    rows = output_sensitivity(model, calib, ev, layers=["conv_b"], ratios=(0.25, 0.5), batch_size=4)
    for row in rows:  # independent: refit each copy with calibrate_outputs, run it whole
        cm, _ = kcengine.compress(model, {"layers": {"conv_b": row["k"]}}, layers=["conv_b"], seed=0)
        cm.eval()
        calibrate_outputs(cm, model, calib, layers=["conv_b"], seed=0)
        with torch.no_grad():
            p, q = torch.log_softmax(model(ev), 1), torch.log_softmax(cm(ev), 1)
        ref = float((p.exp() * (p - q)).sum(1).mean())
        assert row["kl"] == pytest.approx(ref, rel=1e-5, abs=1e-8)
    with torch.no_grad():  # serving restores the modules afterwards, and the stored outputs are intact
        cm, _ = kcengine.compress(model, {"layers": {"conv_b": 2}}, layers=["conv_b"], seed=0)
        cm.eval()
        whole = cm(ev[:4])
        for _ in range(2):
            with prefix.serving(cm, 0):
                torch.testing.assert_close(cm(ev[:4]), whole)
        assert "forward" not in cm.stem.__dict__
        torch.testing.assert_close(cm(ev[:4]), whole)


def _duplicated_conv2(kit):
    """TinyNet whose conv2 holds 3 distinct filters, each 4 times: clustered to 3 or more it loses nothing."""
    torch.manual_seed(0)
    model = kit.TinyNet().eval()
    with torch.no_grad():
        model.conv2.weight.copy_(torch.randn(3, 8, 3, 3).repeat(4, 1, 1, 1))
    return model


def test_sensitivity_plan_spends_the_uniform_budget_where_the_outputs_suffer_least(kit):
    """Ratio 0.5 gives 4 + 6 = 10 filters.  conv2 loses nothing down to 3 filters, its floor (min_ratio 0.25 of
    12), so the plan gives it 3 and conv1 the other 7; conv1 alone at 7 costs the network something."""
    model = _duplicated_conv2(kit)
    ds = kit.tiny_data(n=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = sensitivity_plan(model, ds.images[:32], ds.images[32:], 0.5)
    assert plan == {"layers": {"conv1": 7, "conv2": 3}}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # not modified
    _, rep = kcengine.compress(model, plan)
    assert {lr.name: lr.k for lr in rep.layers} == {"conv1": 7, "conv2": 3}
    # below twice the floor (min_ratio 0.25) the floor follows the ratio: 1 + 2 filters at 1/8
    small = sensitivity_plan(model, ds.images[:32], ds.images[32:], 0.125)["layers"]
    assert sum(small.values()) == 3 and min(small.values()) >= 1
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\], got ratio=1.5"):
        sensitivity_plan(model, ds.images[:32], ds.images[32:], 1.5)


def test_compress_refuses_a_sensitivity_plan_and_says_what_measures_it(kit):
    from kcengine.compress import OutputSensitivity, parse_plan

    assert parse_plan("sensitivity=0.5") == parse_plan({"sensitivity": 0.5}) == OutputSensitivity(0.5)
    with pytest.raises(ValueError, match=r"sensitivity ratio must be a ratio in \(0, 1\], got 0"):
        parse_plan({"sensitivity": 0})
    with pytest.raises(ValueError, match=r"kcengine.finetune\(model, loader, plan='sensitivity=0.5'\)"):
        kcengine.compress(kit.TinyNet(), "sensitivity=0.5")


def test_finetune_measures_a_sensitivity_plan_on_its_training_images(kit):
    """``plan={"sensitivity": 0.5}``: each layer refit on finetune's calibration images (evenly spaced over the
    set) and the KL measured on the other images; the model trains with that split (the string form and
    progressive mode too).  The same plan from sensitivity_plan on those images is the reference."""
    model = _duplicated_conv2(kit)
    ds = kit.tiny_data(n=64)
    loader = make_loader(ds, 16, shuffle=True, seed=0)
    calib = evenly_spaced(64, 16)
    rest = [i for i in range(64) if i not in calib]
    want = sensitivity_plan(model, ds.images[calib], ds.images[rest], 0.5)["layers"]
    assert want == {"conv1": 7, "conv2": 3}
    res = kcengine.finetune(model, loader, plan={"sensitivity": 0.5}, epochs=1, calibration_images=16,
                            progress=False)
    assert res.layer_ks == want
    assert {n: res.model.get_submodule(n).num_clusters for n in want} == want
    res = kcengine.finetune(model, loader, plan="sensitivity=0.5", mode="progressive", epochs=0,
                            calibration_images=16, progress=False)
    assert res.layer_ks == want and res.stages == [["conv2"], ["conv1"]]
    with pytest.raises(ValueError, match="needs granularity='filter', got granularity='kernel'"):
        kcengine.finetune(model, loader, plan={"sensitivity": 0.5}, granularity="kernel", progress=False)
