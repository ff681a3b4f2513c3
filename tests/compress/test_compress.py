import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import kcengine
from kcengine.compress import (ElementClusteredConv2d, compress, effective_weight, elbow_index, local_maxima,
                               parse_plan, sensitivity_sweep)
from kcengine.compress.plan import ByChannels, Elbow, FixedRatio, InertiaLimit, PerLayer
from kcengine.nn import ClusteredConv2d


class Net(nn.Module):
    """Not one of our model classes: nested containers, a conv with bias, odd shapes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(),
                                      nn.Sequential(nn.Conv2d(12, 10, (3, 1), stride=2, bias=False)), nn.ReLU())
        self.head = nn.Conv2d(10, 6, 1)

    def forward(self, x):
        return self.head(self.features(x)).mean((2, 3))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _x(seed=1, n=8):
    return torch.randn(n, 3, 9, 7, generator=torch.Generator().manual_seed(seed))


NAMES = ["features.0", "features.2.0", "head"]


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_weights_equal_centroids_of_an_independent_kmeans_call(granularity):
    m = _net()
    before = copy.deepcopy(m.state_dict())
    new, rep = compress(m, ratio=0.5, granularity=granularity, seed=3)
    for name, p in m.state_dict().items():  # the caller's model is untouched
        assert torch.equal(p, before[name])
    for name in NAMES:
        conv = m.get_submodule(name)
        w = conv.weight.detach()
        pts = (w.reshape(w.shape[0], -1) if granularity == "filter" else w.reshape(-1, w.shape[2] * w.shape[3]))
        k = max(1, int(np.floor(pts.shape[0] * 0.5 + 0.5)))
        ref = kcengine.kmeans(pts.numpy(), k, seed=3)
        expect = torch.from_numpy(ref.centroids[ref.labels]).reshape(w.shape)
        layer = new.get_submodule(name)
        assert type(layer).__name__ == "ClusteredConv2d"
        assert torch.equal(layer.to_dense(), expect)
        lr = next(r for r in rep.layers if r.name == name)
        assert lr.k == k and lr.inertia == pytest.approx(float(ref.inertia), rel=1e-6)
        d = (expect - w).double()
        assert lr.l0 == int((d != 0).sum()) and lr.l2 == pytest.approx(float(d.norm()))
        assert lr.linf == pytest.approx(float(d.abs().max()))
    # the clustered model computes what a dense model with those weights computes
    dense = copy.deepcopy(m)
    for name in NAMES:
        dense.get_submodule(name).weight.data = new.get_submodule(name).to_dense().detach()
    with torch.no_grad():
        torch.testing.assert_close(new(_x()), dense(_x()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_k_equal_n_leaves_the_model_unchanged(granularity):
    m = _net()
    new, rep = compress(m, ratio=1.0, granularity=granularity)
    for name in NAMES:
        assert torch.equal(effective_weight(new.get_submodule(name)), m.get_submodule(name).weight.detach())
    assert all(r.l0 == 0 for r in rep.layers)
    with torch.no_grad():
        torch.testing.assert_close(new(_x()), m(_x()), atol=1e-5, rtol=1e-5)


def test_threshold_keeps_exactly_the_far_filters():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 9, 3, bias=False)
    base = torch.randn(3, 2, 3, 3)
    w = base.repeat_interleave(3, 0) + 0.01 * torch.randn(9, 2, 3, 3)
    w[4] = base[1] + 3.0  # far from every cluster: will be pulled into one and sit far from its centroid
    w[8] = base[2] - 2.5
    conv.weight.data = w
    model = nn.Sequential(conv)
    plain, _ = compress(model, ratio=3 / 9, seed=0)
    wp = plain[0].to_dense().detach()
    dist = (wp - w).reshape(9, -1).norm(dim=1)
    tau = 1.0
    far = set(torch.nonzero(dist > tau).flatten().tolist())
    assert far and len(far) < 9  # the construction gives a non-trivial case
    thr, rep = compress(model, ratio=3 / 9, seed=0, threshold=tau)
    wt = thr[0].to_dense().detach()
    for o in range(9):
        assert torch.equal(wt[o], w[o] if o in far else wp[o]), o
    lr = rep.layers[0]
    used = len({tuple(wp[o].flatten().tolist()) for o in range(9) if o not in far})
    assert lr.kept == len(far) and lr.unique_weights == (used + len(far)) * 18


def _optimal_1d(values, k):
    """Optimal 1-D k-means by dynamic programming over the sorted values (reference)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = v.size
    c1, c2 = np.concatenate([[0], np.cumsum(v)]), np.concatenate([[0], np.cumsum(v * v)])

    def cost(i, j):  # points v[i:j]
        s, s2, m = c1[j] - c1[i], c2[j] - c2[i], j - i
        return s2 - s * s / m

    D = np.full((k + 1, n + 1), np.inf)
    D[0, 0] = 0
    for q in range(1, k + 1):
        for j in range(1, n + 1):
            D[q, j] = min((D[q - 1, i] + cost(i, j) for i in range(q - 1, j)), default=np.inf)
    return D[k, n]


def test_element_granularity_is_per_coordinate_optimal_1d():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 11, (2, 2), bias=False)
    model = nn.Sequential(conv)
    new, rep = compress(model, ratio=4 / 11, granularity="element")
    layer = new[0]
    assert isinstance(layer, ElementClusteredConv2d)
    w = conv.weight.detach().reshape(11, -1).numpy().astype(np.float64)
    wn = layer.to_dense().detach().reshape(11, -1).numpy().astype(np.float64)
    total = 0.0
    for j in range(w.shape[1]):
        assert len(np.unique(wn[:, j])) <= 4
        got = float(((w[:, j] - wn[:, j]) ** 2).sum())
        best = _optimal_1d(w[:, j], 4)
        assert got == pytest.approx(best, rel=1e-5, abs=1e-9)
        total += best
    assert rep.layers[0].inertia == pytest.approx(total, rel=1e-5)
    assert rep.layers[0].unique_weights == 8 * 4
    with torch.no_grad():
        x = torch.randn(3, 2, 5, 5)
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, layer.to_dense()))


def test_cosine_keeps_norms_and_forward_matches():
    m = _net()
    new, rep = compress(m, ratio=0.5, cosine=True)
    for name in NAMES:
        w = m.get_submodule(name).weight.detach()
        layer = new.get_submodule(name)
        we = effective_weight(layer)
        torch.testing.assert_close(we.reshape(w.shape[0], -1).norm(dim=1), w.reshape(w.shape[0], -1).norm(dim=1))
        assert torch.equal(torch.unique(layer.to_dense().reshape(w.shape[0], -1).norm(dim=1).round(decimals=5)),
                           torch.ones(1))
    dense = copy.deepcopy(m)
    for name in NAMES:
        dense.get_submodule(name).weight.data = effective_weight(new.get_submodule(name))
    with torch.no_grad():
        torch.testing.assert_close(new(_x()), dense(_x()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cosine=True.*granularity='filter'"):
        compress(m, ratio=0.5, cosine=True, granularity="kernel")


def test_cosine_layer_counts_its_norms_and_bias_and_says_cosine():
    """A cosine layer keeps its norms in scale and its bias in shift: its counts left both out (108 unique of
    216 dense for a biased 8-filter conv, ratio 2.0) and it printed as bias=False, fused_bn=True."""
    conv = nn.Conv2d(3, 8, 3, bias=True)
    new, rep = compress(nn.Sequential(conv), ratio=0.5, cosine=True)
    layer = new[0]
    assert layer.dense_parameters == sum(p.numel() for p in conv.parameters()) == 224
    assert layer.unique_parameters == 4 * 27 + 8 + 8  # codebook, norms, bias
    assert layer.compression_ratio == 224 / 124
    text = repr(layer)
    assert "cosine=True" in text and "fused_bn" not in text and "bias=False" not in text
    unbiased, _ = compress(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False)), ratio=0.5, cosine=True)
    assert unbiased[0].dense_parameters == 216 and unbiased[0].unique_parameters == 4 * 27 + 8  # no bias to count


def test_layer_selection_and_per_layer_plans():
    m = _net()
    _, rep = compress(m, ratio=0.5, layers="first")
    assert [r.name for r in rep.layers] == ["features.0"]
    _, rep = compress(m, plan="map:features.0=3,head=0.5")
    assert {r.name: r.k for r in rep.layers} == {"features.0": 3, "head": 3}
    _, rep = compress(m, plan={"layers": {"re:features\\..*": 2}})
    assert {r.name: r.k for r in rep.layers} == {"features.0": 2, "features.2.0": 2}
    _, rep = compress(m, plan="channels:12=0.25,6=2")
    assert {r.name: r.k for r in rep.layers} == {"features.0": 3, "head": 2}
    assert rep.skipped == ["features.2.0"]
    # a channel count no layer has was ignored while another matched (a typo went unnoticed)
    with pytest.raises(ValueError, match=r"channels plan names C_out=99, which no conv layer of the model has"):
        compress(m, plan="channels:12=0.25,99=2")
    _, rep = compress(m, plan="channels:12=0.25,6=2", layers="first")  # a count of a layer left out is fine
    assert [r.name for r in rep.layers] == ["features.0"]
    # a dict key is an exact name: one that looks like a pattern says how to write one
    with pytest.raises(ValueError, match=r"names layer 'features\.\.\*', .* in a dict plan write 're:features\.\.\*'"):
        compress(m, plan={"layers": {"features..*": 2}})
    _, rep = compress(m, ratio=0.5, layers="features.*")
    assert [r.name for r in rep.layers] == ["features.0", "features.2.0"]


def test_inertia_and_elbow_plans_pick_from_the_sweep():
    m = _net()
    limit = 2.0
    _, rep = compress(m, plan={"inertia": limit}, layers=["features.0"])
    w = m.features[0].weight.detach().reshape(12, -1).numpy()
    ref = kcengine.kmeans_sweep(w, list(range(1, 13)), seed=0)
    k = rep.layers[0].k
    assert float(ref[k - 1].inertia) <= limit and (k == 1 or float(ref[k - 2].inertia) > limit)
    _, rep = compress(m, plan="relative_inertia=0.0", layers=["head"])
    assert rep.layers[0].k == 6  # only k = N reaches zero inertia
    _, rep = compress(m, plan="elbow", layers=["features.0"])
    assert 1 <= rep.layers[0].k <= 12 and "elbow" in rep.layers[0].note


def test_relative_inertia_one_is_k_one():
    """relative_inertia=1.0 is met at k = 1 by definition; the limit was the total sum of squares computed apart
    from the sweep, which fell an ulp below the sweep's own k = 1 inertia for 4 of 20 seeds: k = 2."""
    for seed in range(20):
        torch.manual_seed(seed)
        _, rep = compress(nn.Sequential(nn.Conv2d(3, 16, 3)), plan={"relative_inertia": 1.0})
        assert rep.layers[0].k == 1, seed


@pytest.mark.parametrize("n, ratio, k", [(100, 0.145, 15), (1000, 0.0145, 15), (100, 0.135, 14), (16, 0.5, 8),
                                         (3, 0.5, 2), (10, 1 / 3, 3), (7, 1e-9, 1), (200, 0.0025, 1)])
def test_ratio_to_k_rounds_the_decimal_product_halves_up(n, ratio, k):
    """k = round(N * ratio), halves up, on the ratio as written: 100 * 0.145 is 14.499999999999998 in floats."""
    from fractions import Fraction

    from kcengine.compress.plan import ratio_to_k

    assert ratio_to_k(n, ratio) == k == max(1, int(n * Fraction(str(ratio)) + Fraction(1, 2)))


def test_inertia_plan_on_a_layer_of_more_than_64_points_sweeps_a_geometric_grid():
    """features.2.0 has 120 kernels: the plan sweeps 1..120 on a geometric grid (not every k), and picks the
    grid's smallest k within the limit, as an independent sweep over that grid says."""
    from kcengine.compress.apply import candidate_ks
    grid = candidate_ks(120)
    assert grid[0] == 1 and grid[-1] == 120 and grid == sorted(set(grid)) and 30 <= len(grid) <= 65
    # spread over the range: each step one k, or a ratio near 120 ** (1/63), about 1.08
    assert all(b == a + 1 or b / a <= 1.15 for a, b in zip(grid, grid[1:]))
    m = _net()
    w = m.features[2][0].weight.detach().reshape(120, 3).numpy()
    ref = kcengine.kmeans_sweep(w, grid, seed=0)
    inert = [float(r.inertia) for r in ref]
    limit = float(np.median(inert))
    new, rep = compress(m, plan={"inertia": limit}, granularity="kernel", layers=["features.2.0"])
    want = next(i for i, v in enumerate(inert) if v <= limit)
    assert rep.layers[0].k == grid[want] and grid[want] not in (1, 120)
    assert rep.layers[0].inertia == pytest.approx(inert[want], rel=1e-6)
    got = new.features[2][0].to_dense().detach().reshape(120, 3).numpy()
    np.testing.assert_allclose(got, ref[want].centroids[ref[want].labels], rtol=1e-6, atol=1e-7)


def test_inertia_plan_at_element_granularity_sums_the_coordinates_optimal_1d_inertias():
    """Element granularity sweeps k for the whole layer, one ragged call over every (coordinate, k): the
    chosen k is the smallest whose summed per-coordinate optimum is within the limit."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 11, (2, 2), bias=False)
    w = conv.weight.detach().reshape(11, -1).numpy().astype(np.float64)
    totals = [sum(_optimal_1d(w[:, j], k) for j in range(w.shape[1])) for k in range(1, 12)]
    limit = 0.5 * (totals[3] + totals[4])  # between k = 4 and k = 5
    new, rep = compress(nn.Sequential(conv), plan={"inertia": limit}, granularity="element")
    assert rep.layers[0].k == 5
    assert rep.layers[0].inertia == pytest.approx(totals[4], rel=1e-5)
    wn = new[0].to_dense().detach().reshape(11, -1).numpy()
    assert all(len(np.unique(wn[:, j])) <= 5 for j in range(w.shape[1]))


def test_elbow_index_on_a_known_curve():
    ks = [1, 2, 3, 4, 5, 6, 7, 8]
    y = [100, 40, 12, 10, 9, 8, 7, 6]
    assert elbow_index(ks, y) == 2
    assert local_maxima([1, 3, 2, 2, 5, 4]) == [1, 4]
    assert local_maxima([5, 4, 3]) == [0]
    assert local_maxima([1, 2, 2, 3]) == [3]  # a plateau on the way up is no peak (it reported [1, 3])
    assert local_maxima([1, 2, 2, 1, 4, 4]) == [1, 4]


@pytest.mark.parametrize("plan,msg", [
    ("ratio=0", "ratio must be a ratio in \\(0, 1\\]"),
    ("ratio=1.5", "ratio must be a ratio in \\(0, 1\\]"),
    ("ratio=abc", "'abc' is not a number"),
    ("bogus", "not understood"),
    ("speed=3", "unknown strategy 'speed'"),
    ("elbow=0.1:0.2", "START:STOP:STEP"),
    ("map:", "no entries"),
    ("map:features.0", "NAME=VALUE"),
    ("map:features.0=0", "int k >= 1 or a ratio"),
    ("channels:x=2", "channel count 'x' is not an int"),
    ({"ratio": 0.5, "inertia": 1}, "exactly one key"),
    ({"kk": 3}, "plan key 'kk' is unknown"),
    ("inertia=-1", "inertia limit must be a finite number >= 0"),
    (1.5, "ratio must be a ratio in \\(0, 1\\]"),
    (8, "a bare number is a ratio in \\(0, 1\\].*'re:\\.\\*': 8"),
    ("8", "a bare number is a ratio in \\(0, 1\\].*'re:\\.\\*': 8"),  # the CLI's --plan 8
    ("1.5", "ratio must be a ratio in \\(0, 1\\]"),
    ("nan", "ratio must be a ratio in \\(0, 1\\]"),
    (True, "must be a strategy, a dict, a string or a ratio, got bool"),
])
def test_plan_parsing_errors_are_clear(plan, msg):
    with pytest.raises(ValueError, match=msg):
        parse_plan(plan)


@pytest.mark.parametrize("plan, kw, msg", [
    ({"layers": {"head": "x"}}, {}, r"per-layer plan value for 'head' must be an int k >= 1 or a ratio in "
     r"\(0, 1\], got 'x'"),
    ({"layers": {"head": -2}}, {}, r"per-layer plan value for 'head' must be an int k >= 1 .*got -2"),
    ({"layers": {}}, {}, r"a per-layer plan needs a non-empty mapping of layer name -> k or ratio, got \{\}"),
    ({"layers": {3: 2}}, {}, r"per-layer plan keys must be layer names or 're:' patterns, got 3"),
    ({"layers": {"re:[": 2}}, {}, r"per-layer plan pattern 're:\[' is not a valid regex"),
    ({"layers": {"re:zz.*": 2}}, {}, r"per-layer plan pattern 're:zz.\*' matches no conv layer; layers are "
     r"features.0, features.2.0, head"),
    ({"layers": {"nothere": 2}}, {}, r"per-layer plan names layer 'nothere', which is not a selected conv layer"),
    ({"channels": {}}, {}, r"a by-channels plan needs a non-empty mapping C_out -> k or ratio, got \{\}"),
    ({"channels": {0: 2}}, {}, r"by-channels plan keys must be channel counts \(ints >= 1\), got 0"),
    ({"channels": {12: 2.5}}, {}, r"by-channels plan value for C_out=12 must be an int k >= 1 or a ratio in "
     r"\(0, 1\], got 2.5"),
    ("relative_inertia=1.5", {}, r"relative_inertia is a fraction of the k=1 inertia in \[0, 1\], got 1.5"),
    ("elbow=0.5:0.6:0.1", {}, r"elbow needs at least 3 distinct ratios, got \(0.5, 0.6\)"),
    ("elbow=0.5:0.2:0.1", {}, r"elbow range '0.5:0.2:0.1' needs START <= STOP and STEP > 0"),
    ("elbow=0.1:1:1e-12", {}, r"elbow range '0.1:1:1e-12' gives more than 1000 ratios \(a larger STEP\)"),  # hung
    ("elbow=0.1:1:1e-320", {}, r"elbow range '0.1:1:1e-320' gives more than 1000 ratios"),  # an OverflowError
    ("elbow=nan:1:0.1", {}, r"elbow range 'nan:1:0.1' needs finite START, STOP and STEP"),
    ("elbow=0.1:inf:0.1", {}, r"elbow range '0.1:inf:0.1' needs finite START, STOP and STEP"),
    ({"elbow": 0.5}, {}, r"elbow takes a sequence of ratios in \(0, 1\] \(e.g. \[0.1, 0.2, ..., 1.0\]\), got 0.5"),
    ({"elbow": "0.1,0.2,0.3"}, {}, r"elbow takes a sequence of ratios .*, got '0.1,0.2,0.3'"),  # not its characters
    ({"elbow": False}, {}, r"elbow takes a sequence of ratios .*, got False"),
    ({"layers": "conv1=2"}, {}, r"plan \{'layers': ...\} takes a dict \(\{'conv1': 8, ...\}\), got str 'conv1=2'"),
    ({"layers": [("conv1", 2, 3)]}, {}, r"plan \{'layers': ...\} takes a dict .*, got list"),
    ({"channels": [12]}, {}, r"plan \{'channels': ...\} takes a dict \(\{64: 32, ...\}\), got list \[12\]"),
    (0.5, {"layers": "["}, r"layers='\[' is not a valid regex"),
    (0.5, {"layers": ["nope"]}, r"layers names \['nope'\] which are not conv layers of the model; layers are "
     r"features.0, features.2.0, head"),
    (0.5, {"layers": []}, r"layers is empty: select at least one conv layer"),
    (0.5, {"layers": 3}, r"layers must be None, 'first', a regex string or a list of names, got 3"),
    (0.5, {"cosine": "yes"}, r"cosine must be True or False, got cosine='yes'"),
    ("map:conv1=2,conv1=3", {}, r"map plan: 'conv1' is given twice \(2 and 3\)"),
])
def test_plan_and_layer_errors_name_the_value(plan, kw, msg):
    m = _net()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=msg):
        compress(m, plan, **kw)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_plan_forms_parse():
    assert parse_plan(ratio=0.25) == FixedRatio(0.25)
    assert parse_plan(0.25) == FixedRatio(0.25)  # a bare float is the ratio (finetune(plan=0.5), compress)
    assert parse_plan(np.float32(0.5)) == FixedRatio(0.5)
    assert parse_plan("ratio=0.5") == FixedRatio(0.5)
    assert parse_plan("0.5") == FixedRatio(0.5)  # the CLI's --plan 0.5, as plan=0.5
    assert parse_plan(" 1.0 ") == FixedRatio(1.0)
    assert parse_plan("inertia=2") == InertiaLimit(2)
    assert parse_plan("relative_inertia=0.1") == InertiaLimit(0.1, relative=True)
    assert parse_plan("elbow=0.25:1.0:0.25") == Elbow((0.25, 0.5, 0.75, 1.0))
    assert parse_plan("map:layer3.*=0.25").mapping == {"re:layer3.*": 0.25}
    assert parse_plan("channels:16=0.75,64=8") == ByChannels({16: 0.75, 64: 8})
    assert isinstance(parse_plan({"layers": {"head": 2}}), PerLayer)


def test_progress_names_each_long_step_after_the_checks():
    """progress= gets one line before the k sweeps (inertia/elbow plans), the clustering and the evaluation,
    and nothing when an argument is refused (those fail before any work)."""
    m = _net()
    lines = []
    compress(m, ratio=0.5, progress=lines.append)
    assert lines == ["clustering 3 layer(s) at filter granularity: 3 k-means problem(s), 28 points, 14 centers "
                     "in all, one batched call"]
    lines.clear()
    compress(m, ratio=0.5, granularity="kernel", layers=["head"], eval_data=(_x(), torch.arange(8) % 6),
             progress=lines.append)
    assert lines == ["clustering 1 layer(s) at kernel granularity: 1 k-means problem(s), 60 points, 30 centers in "
                     "all, one batched call", "evaluating the accuracy of the model before and after"]
    lines.clear()
    compress(m, plan="elbow", layers=["features.0"], progress=lines.append)  # the sweep's fit is reused
    assert len(lines) == 1 and lines[0].startswith("choosing k for 1 layer(s), elbow over ratios")
    lines.clear()
    with pytest.raises(ValueError, match="names layer 'nope'"):
        compress(m, plan="map:nope=2", progress=lines.append)
    assert lines == []
    with pytest.raises(ValueError, match="progress must be None or a callable taking one line of text, got 3"):
        compress(m, ratio=0.5, progress=3)


def test_compress_argument_errors_name_the_value():
    m = _net()
    with pytest.raises(ValueError, match="granularity must be one of .* got granularity='row'"):
        compress(m, ratio=0.5, granularity="row")
    with pytest.raises(ValueError, match="either plan= or ratio="):
        compress(m, plan="ratio=0.5", ratio=0.5)
    with pytest.raises(ValueError, match="no plan"):
        compress(m)
    with pytest.raises(ValueError, match="names layer 'nope'"):
        compress(m, plan="map:nope=2")
    with pytest.raises(ValueError, match="layer head: k=7 must be in \\[1, 6\\]"):
        compress(m, plan="map:head=7")
    with pytest.raises(ValueError, match="layers='conv9' matches no conv layer"):
        compress(m, ratio=0.5, layers="conv9")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sede'\] \(did you mean seed=\?\); compress takes "
                                         r"plan, ratio, granularity, .* and the k-means options seed, backend"):
        compress(m, ratio=0.5, sede=1)
    # compress's own argument misspelt was answered with the k-means options alone, as if ratio were not one
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ratios'\] \(did you mean ratio=\?\); compress "
                                         r"takes plan, ratio, granularity, layers, threshold, cosine"):
        compress(m, ratios=0.5)
    with pytest.raises(ValueError, match="threshold applies"):
        compress(m, ratio=0.5, granularity="element", threshold=0.1)
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0.0 or None, got threshold=nan"):
        compress(m, ratio=0.5, threshold=float("nan"))
    with pytest.raises(ValueError, match="eval_batch_size must be an int >= 1, got eval_batch_size=0"):
        compress(m, ratio=0.5, eval_batch_size=0)  # was accepted while eval_data was None
    with pytest.raises(ValueError, match="holds no nn.Conv2d"):
        compress(nn.Linear(2, 2), ratio=0.5)
    for gran in ("filter", "element"):  # a clustered model is told so, not "no nn.Conv2d"
        clustered, _ = compress(m, ratio=0.5, granularity=gran)
        with pytest.raises(ValueError, match="already clustered \\(3 clustered conv layers"):
            compress(clustered, ratio=0.5)
    with pytest.raises(ValueError, match="conv_backend must be one of .* got conv_backend='tpu'"):
        compress(m, ratio=0.5, conv_backend="tpu")  # was accepted, then failed at the first forward
    with pytest.raises(ValueError, match="conv_backend must be one of .* got conv_backend='cuda'"):
        compress(m, ratio=0.5, conv_backend="cuda")  # a k-means backend only: accepted, then every forward failed
    with pytest.raises(ValueError, match="eval_data must be a DataLoader, a Dataset or an \\(images, labels\\) pair"):
        compress(m, ratio=0.5, eval_data=[1, 2, 3])  # was an AttributeError
    empty = (torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))  # named, before the clustering
    with pytest.raises(ValueError, match=r"eval_data holds no images \(shapes \(0, 3, 8, 8\) and \(0,\)\)"):
        compress(m, ratio=0.5, eval_data=empty)
    with pytest.raises(ValueError, match=r"eval_data holds no images \(an empty TensorDataset\)"):
        compress(m, ratio=0.5, eval_data=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*empty)))
    said = []  # a bad pair is refused before the clustering, by the argument's name (was: after it, as "data")
    with pytest.raises(ValueError, match=r"eval_data's images and labels differ in length: shapes \(4, 3, 8, 8\) "
                                         r"vs \(3,\)"):
        compress(m, ratio=0.5, eval_data=(torch.randn(4, 3, 8, 8), torch.zeros(3, dtype=torch.long)),
                 progress=said.append)
    assert said == []
    with pytest.raises(ValueError, match="layer 'features.0' has its weights on the meta device"):
        compress(copy.deepcopy(m).to("meta"), ratio=0.5)  # was Tensor.item()'s RuntimeError
    lazy = nn.Sequential(nn.LazyConv2d(8, 3), nn.Conv2d(8, 4, 3))  # was torch's message, naming no layer
    with pytest.raises(ValueError, match=r"layer '0' is a lazy conv whose weights are not initialized yet"):
        compress(lazy, ratio=0.5)
    # the layer is named (before: the k-means problem's index, no layer)
    nan = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        nan[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '1' has NaN or Inf weights"):
        compress(nan, ratio=0.5)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="layer '0.1' has NaN or Inf weights"):  # was k-means' "x holds NaN"
        sensitivity_sweep(nn.Sequential(nan, nn.Flatten(), nn.Linear(4 * 7 * 5, 2)), _x(n=4), labels,
                          ratios=(0.5,))
    with pytest.warns(UserWarning, match="zero-element"):  # (torch's, at the init)
        empty = nn.Sequential(nn.Conv2d(3, 0, 3), nn.Conv2d(0, 4, 1))  # was a reshape's RuntimeError
    for granularity in ("filter", "kernel", "element"):
        with pytest.raises(ValueError, match=r"layer '0' has no weights to cluster \(weight shape \(0, 3, 3, 3\)\)"):
            compress(empty, ratio=0.5, granularity=granularity)


def test_a_conv_selected_by_its_second_path_is_named():
    """One conv reached by two names (``self.b = self.a``): named_modules gives only the first, and the
    second was reported as no conv layer at all."""
    class Shared(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))

    m = Shared(nn.Conv2d(3, 4, 3), nn.ReLU())
    m.add_module("again", m[0])  # (a Sequential would run it a second time; this one does not)
    note = r"'again' is layer '0' reached by a second path: name it '0'"
    with pytest.raises(ValueError, match=r"layers names \['again'\] which are not conv layers of the model \(" + note):
        compress(m, ratio=0.5, layers=["again"])
    with pytest.raises(ValueError, match=r"per-layer plan names layer 'again', .*\(" + note):
        compress(m, {"layers": {"again": 2}})
    with pytest.raises(ValueError, match=r"'0.again' is layer '0.0' reached by a second path: name it '0.0'"):
        sensitivity_sweep(nn.Sequential(m, nn.Flatten(), nn.Linear(4 * 7 * 5, 2)), _x(n=4),
                          torch.zeros(4, dtype=torch.long), layers=["0.again"])
    cm, _ = compress(m, ratio=0.5, layers=["0"])
    assert cm.again is cm[0] and isinstance(cm[0], ClusteredConv2d)  # the one module, replaced once


def test_report_json_and_markdown(tmp_path):
    m = _net()
    x = _x(n=20)
    y = torch.randint(0, 6, (20,))
    _, rep = compress(m, ratio=0.5, eval_data=(x, y))
    d = json.loads(rep.to_json(tmp_path / "r.json"))
    assert d["total_conv_weights"] == sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Conv2d))
    assert d["accuracy_before"] is not None and len(d["layers"]) == 3
    md = rep.to_markdown(tmp_path / "r.md")
    assert "| features.0 | 12 | 12 | 6 |" in md
    assert str(rep) == md  # print(report) shows the summary, not a page of dataclass fields


def test_a_model_compressed_in_steps_reports_the_whole_models_totals():
    """Session 55: compress on a partly clustered model counted only the convs still dense: the totals left out
    the layers clustered before (its ratio read 1.000x for a model stored 2x smaller)."""
    from kcengine.compress.layers import conv_weight_counts

    m = _net()
    step1, r1 = compress(m, ratio=0.25, layers=["features.0"], granularity="kernel")
    step2, r2 = compress(step1, ratio=0.5, layers=NAMES[1:])
    c = conv_weight_counts(step2)
    assert r2.total_conv_weights == c["weights"] == r1.total_conv_weights
    assert r2.model_unique_weights == c["stored"] and r2.compression_ratio == pytest.approx(c["weights"] / c["stored"])
    w, st = conv_weight_counts(step1)["weights"], conv_weight_counts(step1)["stored"]
    assert r2.already_clustered == {"features.0": [r1.layers[0].dense_weights, r1.layers[0].unique_weights]}
    assert r1.model_unique_weights == st and r1.total_conv_weights == w and r1.already_clustered == {}
    assert "clustered before: 1" in r2.to_markdown() and "clustered before" not in r1.to_markdown()
    assert json.loads(r2.to_json())["already_clustered"] == {"features.0": list(r2.already_clustered["features.0"])}


def test_sensitivity_sweep_rows_and_metric():
    m = _net()
    x = _x(n=40)
    with torch.no_grad():
        y = m(x).argmax(1)  # the model is right on every image: baseline 100%
    res = sensitivity_sweep(m, x, y, ratios=(0.25, 0.5, 1.0))
    assert res.baseline_accuracy == 1.0
    assert res.layers() == NAMES
    for name in NAMES:
        rows = res.layer_rows(name)
        assert rows[-1]["k_ratio"] == 1.0 and rows[-1]["accuracy"] == 1.0
        for r in rows:
            assert r["F"] == pytest.approx(r["accuracy"] / r["unique_ratio"])
        assert [i for i, r in enumerate(rows) if r["F_local_max"]] == local_maxima([r["F"] for r in rows])
    # an independent check of one point: features.0 at k = 6 (0.5)
    new, _ = compress(m, plan="map:features.0=6")
    with torch.no_grad():
        acc = float((new(x).argmax(1) == y).float().mean())
    row = next(r for r in res.layer_rows("features.0") if r["k"] == 6)
    assert row["accuracy"] == pytest.approx(acc)


def test_sensitivity_sweep_checks_its_arguments_before_any_work():
    """sensitivity_sweep took an unknown option (a typo of seed ran unseeded), ratios outside (0, 1] (0 became
    k = 1, 2.0 k = N), labels past the model's outputs (a baseline of 0%) and float labels without a word, and
    failed deep inside (ZeroDivisionError, range(), AttributeError, torch's dtype error) on the rest."""
    m = _net()
    x = _x(n=8)
    with torch.no_grad():
        y = m(x).argmax(1)
    cases = [
        (dict(sede=3), r"unknown option\(s\) \['sede'\] \(did you mean seed=\?\); sensitivity_sweep takes "
                       r"granularity, layers, ratios, batch_size, progress and the k-means options seed"),
        (dict(ratio=0.5), r"unknown option\(s\) \['ratio'\] \(did you mean ratios=\?\)"),
        (dict(ratios=(0, 0.5)), r"each of ratios must be a ratio in \(0, 1\], got 0"),
        (dict(ratios=(2.0,)), r"each of ratios must be a ratio in \(0, 1\], got 2.0"),
        (dict(ratios=(float("nan"),)), r"each of ratios must be a ratio in \(0, 1\], got nan"),
        (dict(ratios="0.5"), r"ratios must be a sequence of k/N values in \(0, 1\] or None, got ratios='0.5'"),
        (dict(ratios=0.5), r"ratios must be a sequence .* got ratios=0.5"),
        (dict(ratios=()), r"ratios is empty"),
        (dict(batch_size=0), r"batch_size must be an int >= 1, got batch_size=0"),
        (dict(progress="yes"), r"progress must be"),
        (dict(granularity="filters"), r"granularity must be one of .* got granularity='filters'"),
        (dict(labels=y + 6), r"labels must be in \[0, 6\) \(the model's outputs\), got values in \[\d+, \d+\]"),
        (dict(labels=y.float()), r"labels must be integer class indices, got dtype torch.float32"),
        (dict(images=x[:0], labels=y[:0]), r"\(images, labels\) holds no images"),
        (dict(images=x.double()), r"images are torch.float64 but the model's parameters are torch.float32"),
        (dict(images=(x * 100).to(torch.uint8)), r"\(images, labels\)'s images must be"),
        (dict(model=None), r"model must be an nn.Module, got NoneType"),
    ]
    for change, msg in cases:
        args = {"model": m, "images": x, "labels": y, **change}
        model, images, labels = args.pop("model"), args.pop("images"), args.pop("labels")
        with pytest.raises(ValueError, match=msg):
            sensitivity_sweep(model, images, labels, **args)


def test_sensitivity_sweep_checks_take_what_the_sweep_took():
    """The argument checks' first form refused a model whose logits for one image are squeezed to [C], took
    tensors of ratios for bad values and used up a generator of them, and initialized a caller's lazy module
    (with inference tensors) before sweeping its random weights."""
    m = _net()
    x = _x(n=8)
    with torch.no_grad():
        y = m(x).argmax(1)
    want = sensitivity_sweep(m, x, y, ratios=(0.25, 0.5), layers=["features.0"])
    got = sensitivity_sweep(m, x, y, ratios=torch.tensor([0.25, 0.5]), layers=["features.0"])
    assert [r["accuracy"] for r in got.rows] == [r["accuracy"] for r in want.rows]
    got = sensitivity_sweep(m, x, y, ratios=(r for r in (0.25, 0.5)), layers=["features.0"])
    assert [r["k"] for r in got.rows] == [r["k"] for r in want.rows]

    class Squeezed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t).squeeze()

    got = sensitivity_sweep(Squeezed(m), x, y, ratios=(0.25, 0.5), layers=["inner.features.0"])
    assert [r["accuracy"] for r in got.rows] == [r["accuracy"] for r in want.rows]
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(ValueError, match=r"model has a lazy module whose weights are not initialized yet"):
        sensitivity_sweep(lazy, x, y)
    assert isinstance(lazy[0].weight, nn.parameter.UninitializedParameter)


def test_resnet20_k_equal_n_keeps_accuracy_and_sweep_prefix_cache_agrees(shared_data):
    from kcengine.data import cifar10_dataset
    from kcengine.evaluate import evaluate
    from kcengine.models import load_model

    lm = load_model("resnet20", shared_data / "checkpoints" / "resnet20-12fca82f.th")
    ds = cifar10_dataset(shared_data, "test")
    new, rep = compress(lm.model, ratio=1.0)
    assert evaluate(new, ds).correct == 776
    # the staged runner (re-runs only the blocks after the layer) gives the full-model accuracy
    x, y = ds.images[:200], ds.labels[:200]
    res = sensitivity_sweep(lm.model, x, y, layers=["layer2.1.conv2"], ratios=(0.5,))
    row = res.rows[0]
    new, _ = compress(lm.model, plan="map:layer2.1.conv2=16")
    assert row["k"] == 16 and row["accuracy"] == evaluate(new, (x, y)).top1


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the dense reference's (torch's)
@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_string_padding_becomes_numbers(granularity, tmp_path):
    """padding='same' (odd and even kernel extents, dilation, a padding mode) and 'valid' convs cluster: with one
    cluster per point the compressed model equals the dense one, and the saved file loads back.  An even
    kernel's 'same' pads its odd row and column at the bottom and right, as torch does (it was refused)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding="same"), nn.ReLU(), nn.Conv2d(6, 6, (1, 5), padding="same"),
                      nn.Conv2d(6, 6, 3, padding="same", dilation=2), nn.Conv2d(6, 6, (2, 4), padding="same"),
                      nn.Conv2d(6, 6, 2, padding="same", dilation=(1, 3), padding_mode="reflect"),
                      nn.Conv2d(6, 4, 3, stride=2, padding="valid"))
    x = torch.randn(2, 3, 11, 13)
    small, _ = compress(m, ratio=1.0, granularity=granularity)  # every point its own cluster
    convs = [c for c in small if not isinstance(c, nn.ReLU)]
    assert [tuple(c.padding) for c in convs] == [(1, 1), (0, 2), (2, 2), (0, 1), (0, 1), (0, 0)]
    assert [tuple(c.padding_extra) for c in convs] == [(0, 0)] * 3 + [(1, 1), (1, 1), (0, 0)]
    kcengine.save_compressed(small, tmp_path / "m.pt")
    back = kcengine.load_compressed(tmp_path / "m.pt", m)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), small(x))
    assert [tuple(c.padding_extra) for c in back if not isinstance(c, nn.ReLU)] == \
        [tuple(c.padding_extra) for c in convs]


class _StdConv(nn.Conv2d):
    """A weight-standardized conv: its forward is not a plain conv of its weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_conv_subclasses():
    """A Conv2d subclass with its own forward is refused by name (clustering it would drop that forward); one
    that keeps Conv2d's forward, such as a parametrized weight, clusters its effective weight."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _StdConv(4, 4, 3))
    with pytest.raises(ValueError, match="layer '1': it is a .*_StdConv, a subclass of nn.Conv2d with its own "
                                         "forward.*; leave the layer out with layers="):
        compress(m, ratio=0.5)
    small, _ = compress(m, ratio=0.5, layers=["0"])
    assert isinstance(small[1], _StdConv)
    wn = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 5, 3, padding=1)))
    x = torch.randn(2, 3, 8, 8)
    for granularity in ("filter", "kernel"):
        exact, _ = compress(wn, ratio=1.0, granularity=granularity)
        assert isinstance(exact[0], ClusteredConv2d)
        with torch.no_grad():
            torch.testing.assert_close(exact(x), wn(x), rtol=1e-5, atol=1e-5)
    # session 55: the sweep took the subclass compress refuses, and scored a parametrized conv's dense weight at
    # every k (it replaced .data of a weight the parametrization recomputes): its rows are compress's now
    with pytest.raises(ValueError, match="layer '1': it is a .*_StdConv, a subclass"):
        sensitivity_sweep(nn.Sequential(*m, nn.Flatten(), nn.Linear(64, 3)), torch.randn(4, 3, 8, 8),
                          torch.zeros(4, dtype=torch.long), ratios=(0.5,))
    torch.manual_seed(0)
    head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(5 * 64, 10))
    with torch.no_grad():
        head[2].weight.mul_(10)
    for net in (nn.Sequential(*wn, *head), nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), *head)):
        if isinstance(net[0], nn.Conv2d) and not torch.nn.utils.parametrize.is_parametrized(net[0]):
            net[0].load_state_dict({"weight": wn[0].weight.detach(), "bias": wn[0].bias.detach()})
        net.eval()
        xs = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ys = net(xs).argmax(1)
        res = sensitivity_sweep(net, xs, ys, ratios=(0.2, 0.4, 1.0), layers=["0"], seed=0)
        for row in res.rows:
            small, _ = compress(net, plan={"layers": {"0": row["k"]}}, seed=0)
            with torch.no_grad():
                want = float((small(xs).argmax(1) == ys).float().mean())
            assert row["accuracy"] == pytest.approx(want), (type(net[0]), row["k"])
        assert res.rows[0]["accuracy"] < 1.0


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_padding_modes(granularity, tmp_path):
    """Convs that pad by reflection, replication or wrapping cluster as nn.Conv2d computes them (the input padded
    first): exact at ratio 1, eagerly, fused, exported and after a save and load."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 6, 3, padding=(2, 1), dilation=(2, 1), padding_mode="replicate"),
                      nn.Conv2d(6, 4, 3, stride=2, padding=1, padding_mode="circular"),
                      nn.Conv2d(4, 4, 5, padding="same", padding_mode="reflect")).eval()
    x = torch.randn(2, 3, 11, 13)
    small, _ = compress(m, ratio=1.0, granularity=granularity)
    convs = [c for c in small if hasattr(c, "codebook")]
    assert [c.padding_mode for c in convs] == ["reflect", "replicate", "circular", "reflect"]
    assert "padding_mode='reflect'" in repr(small) or granularity == "element"
    kcengine.save_compressed(small, tmp_path / "m.pt")
    back = kcengine.load_compressed(tmp_path / "m.pt", m)
    with torch.no_grad():
        want = m(x)
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), small(x))
        if granularity != "element":
            torch.testing.assert_close(kcengine.nn.fuse_for_inference(small)(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.export.export(small, (x,)).module()(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding_mode must be one of .* got 'mirror'"):
        ClusteredConv2d(3, 4, 3, 2, padding=1, padding_mode="mirror")


def test_shared_and_bare_convs(tmp_path):
    """A conv registered at two places (applied twice, a shared encoder) becomes ONE clustered layer at both (it
    was replaced at the first path only, the second use left dense); a bare Conv2d as the model comes back
    clustered (it came back dense); both survive a save and load."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    m = nn.Sequential(conv, nn.ReLU(), conv).eval()
    x = torch.randn(2, 4, 6, 6)
    exact, _ = compress(m, ratio=1.0)
    assert isinstance(exact[2], ClusteredConv2d) and exact[0] is exact[2]
    with torch.no_grad():
        torch.testing.assert_close(exact(x), m(x), rtol=1e-5, atol=1e-5)
    small, report = compress(m, ratio=0.5)
    assert small[0] is small[2] and [layer.name for layer in report.layers] == ["0"]
    assert not any(mod.training for mod in small.modules())  # an eval model stays all eval
    kcengine.save_compressed(small, tmp_path / "shared.pt")
    back = kcengine.load_compressed(tmp_path / "shared.pt", m)
    assert back[0] is back[2] and isinstance(back[0], ClusteredConv2d)
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))

    bare = nn.Conv2d(3, 5, 3)
    one, report = compress(bare, ratio=1.0)
    assert isinstance(one, ClusteredConv2d) and [layer.name for layer in report.layers] == [""]
    kcengine.save_compressed(one, tmp_path / "bare.pt")
    y = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(one(y), bare(y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kcengine.load_compressed(tmp_path / "bare.pt", bare)(y), one(y))


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_frozen_convs_stay_frozen(granularity):
    """The clustered layer's codebook and bias take requires_grad from the conv's weight and bias."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3))
    m[0].requires_grad_(False)
    m[1].bias.requires_grad_(False)
    small, _ = compress(m, ratio=0.5, granularity=granularity)
    assert [(p.requires_grad) for p in (small[0].codebook, small[0].bias, small[1].codebook, small[1].bias)] == \
        [False, False, True, False]


def _random_conv_stack(rng):
    """1-3 convs of random geometry: groups, dilation, strides, string paddings, padding modes, bias."""
    c = int(rng.integers(1, 7))
    layers, c_in = [], c
    for _ in range(int(rng.integers(1, 4))):
        g = int(rng.choice([1, 1, 2, 3]))
        g = g if c % g == 0 else 1
        cout = g * int(rng.integers(1, 6))
        pad = ["same", "valid", 0, 1, 2, "same"][int(rng.integers(0, 6))]
        mode = str(rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
        mode = mode if pad not in ("valid", 0) else "zeros"
        stride = 1 if pad == "same" else int(rng.choice([1, 2]))
        layers.append(nn.Conv2d(c, cout, int(rng.choice([1, 2, 3, 4, 5])), stride=stride, padding=pad,
                                dilation=int(rng.choice([1, 1, 2])), groups=g, bias=bool(rng.integers(0, 2)),
                                padding_mode=mode))
        c = cout
    return nn.Sequential(*layers).eval(), c_in


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the dense reference's (torch's)
def test_random_conv_stacks_compress_save_load_and_train(tmp_path):
    """Random small models at every granularity: the clustered forward equals F.conv2d on the effective
    weights (nn.Conv2d with them, so padding modes and lopsided 'same' are torch's own), a compact file
    reloads to the same outputs, and a training step reaches the parameters."""
    rng = np.random.default_rng(41)
    done = 0
    while done < 40:
        model, c_in = _random_conv_stack(rng)
        x = torch.randn(int(rng.integers(1, 3)), c_in, int(rng.integers(9, 16)), int(rng.integers(9, 16)))
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError:
            continue  # a geometry torch itself refuses for this input (reflect padding wider than it)
        gran = ("filter", "kernel", "element")[done % 3]
        small, _ = compress(model, ratio=float(rng.choice([0.25, 0.5, 1.0])), granularity=gran, seed=0)
        dense = copy.deepcopy(model)
        with torch.no_grad():
            for conv, layer in zip(dense, small):
                conv.weight.copy_(effective_weight(layer).reshape(conv.weight.shape))
            want = dense(x)
            y = small(x)
            tol = 1e-4 * (want.abs().max().item() + 1)
            torch.testing.assert_close(y, want, atol=tol, rtol=1e-4, msg=lambda m: f"{gran} {model}: {m}")
            kcengine.save_compressed(small, tmp_path / "m.pt")
            back = kcengine.load_compressed(tmp_path / "m.pt", model)
            torch.testing.assert_close(back(x), y, atol=tol, rtol=1e-4)
        small.train()(x).square().mean().backward()
        assert any(p.grad is not None for p in small.parameters())
        done += 1


@pytest.mark.parametrize("options, match", [
    (dict(seed=-1), r"seed must be an int in \[0, 9223372036854775807\], got seed=-1"),
    (dict(backend="gpu"), r"backend must be one of \('auto', 'cpu', 'torch', 'cuda', 'triton'\), got backend='gpu'"),
    (dict(max_iter=0), r"max_iter must be an int in \[1, 2147483647\], got max_iter=0"),
    (dict(tol=-1.0), r"tol must be a finite number >= 0.0, got tol=-1.0"),
    (dict(algorithm="elk"), r"algorithm must be one of \('auto', .*\), got 'elk'"),
])
def test_bad_kmeans_options_are_refused_before_any_progress_line(options, match):
    """The docstring's promise: progress lines come once every argument is checked (these were found by the
    k-means call, after 'clustering ... one batched call' was said)."""
    lines = []
    with pytest.raises(ValueError, match=match):
        compress(_net(), ratio=0.5, progress=lines.append, **options)
    assert lines == []


def test_a_seed_of_none_or_a_generator_is_drawn_once_and_recorded(monkeypatch):
    """A seed of None or a Generator is drawn once per compress call: every k-means call it makes (here one
    sweep per layer) gets that int, the report records it, and passing it back reproduces the model."""
    import importlib

    apply = importlib.import_module("kcengine.compress.apply")  # (kcengine.compress the attribute is the function)
    seen = []
    real = apply.kmeans_sweep

    def spy(x, ks, **kw):
        seen.append(kw["seed"])
        return real(x, ks, **kw)

    monkeypatch.setattr(apply, "kmeans_sweep", spy)
    for seed in (np.random.default_rng(5), None):
        seen.clear()
        small, rep = compress(_net(), plan="elbow", seed=seed)
        drawn = rep.kmeans_options["seed"]
        assert isinstance(drawn, int) and len(seen) == 3 and set(seen) == {drawn}  # one sweep per conv layer
        again, rep2 = compress(_net(), plan="elbow", seed=drawn)
        assert [lr.k for lr in rep.layers] == [lr.k for lr in rep2.layers]
        for a, b in zip(small.modules(), again.modules()):
            if hasattr(a, "codebook"):
                assert torch.equal(a.codebook, b.codebook)


def test_backend_none_is_auto_and_an_unavailable_backend_is_said_before_any_progress_line():
    _, rep = compress(_net(), ratio=0.5, backend=None)  # as kmeans takes it
    assert rep.kmeans_options["backend"] is None
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend may run")
    lines = []
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: no CUDA device"):
        compress(_net(), ratio=0.5, backend="cuda", progress=lines.append)
    assert lines == []


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_a_float64_model_is_clustered_in_float64_and_its_changes_counted_against_its_own_weights(granularity):
    """float64 layers were clustered in float32 and measured against a float32 copy: at ratio 1.0 every weight
    changed (by its float32 rounding) while the report said l0 = 0."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    new, rep = compress(m, plan=1.0, granularity=granularity)
    with torch.no_grad():
        torch.testing.assert_close(new(x), m(x), rtol=1e-12, atol=1e-12)
    assert all(lr.l0 == 0 and lr.l2 == 0.0 for lr in rep.layers)
    new, rep = compress(m, plan=0.5, granularity=granularity)
    for lr in rep.layers:
        delta = effective_weight(new.get_submodule(lr.name)) - m.get_submodule(lr.name).weight.detach()
        assert lr.l0 == int((delta != 0).sum()) and lr.l2 == pytest.approx(float(delta.norm()), rel=1e-12)


def test_an_elbow_plan_needs_three_distinct_ks_per_layer_and_a_model_that_grows_reads_below_one():
    """Ratios that round to one or two ks per layer gave k=1 (all filters one) or k=N silently."""
    m = _net()
    with pytest.raises(ValueError, match=r"elbow plan: layer 'features.0' \(12 points\) gets only the ks \[1\] "
                                         r"from ratios \[0.01, 0.02, 0.03\]; an elbow needs at least 3 distinct ks"):
        compress(m, plan="elbow=0.01:0.03:0.01")
    with pytest.raises(ValueError, match=r"gets only the ks \[1, 12\]"):
        compress(m, plan={"elbow": [0.01, 0.02, 0.03, 1.0]})
    small = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 2, 1))  # 2 filters: no elbow, kept whole
    _, rep = compress(small, plan="elbow")
    assert [lr.k for lr in rep.layers][1] == 2
    from kcengine.compress.report import _ratio_text

    assert (_ratio_text(0.997), _ratio_text(1.0), _ratio_text(1.004), _ratio_text(2.345)) == \
        ("0.997", "1.00", "1.004", "2.35")


def test_conv_weight_counts_of_each_kind_of_layer():
    """conv_weight_counts (eval's "clustered: ..." line) against counts taken from the layers' shapes: a filter
    layer stores k * D values, a cosine one also its C_out norms, a per-element one D * K, a dense conv its
    weight; a conv reached by two paths counts once."""
    from kcengine.compress.layers import conv_weight_counts

    m = _net()
    d = [c.weight[0].numel() for c in (m.features[0], m.features[2][0], m.head)]  # D of each layer
    n = [c.weight.numel() for c in (m.features[0], m.features[2][0], m.head)]
    assert conv_weight_counts(m) == dict(clustered=0, element=0, dense=3, weights=sum(n), stored=sum(n))
    filt, _ = compress(m, {"layers": {"features.0": 5, "head": 2}})
    assert conv_weight_counts(filt) == dict(clustered=2, element=0, dense=1, weights=sum(n),
                                            stored=5 * d[0] + n[1] + 2 * d[2])
    cos, _ = compress(m, {"layers": {"features.0": 5}}, cosine=True)
    assert conv_weight_counts(cos)["stored"] == 5 * d[0] + 12 + n[1] + n[2]
    elem, _ = compress(m, {"layers": {"head": 3}}, granularity="element")
    assert conv_weight_counts(elem) == dict(clustered=1, element=1, dense=2, weights=sum(n),
                                            stored=n[0] + n[1] + d[2] * 3)
    shared = nn.Sequential(filt.head, filt.head)
    assert conv_weight_counts(shared) == dict(clustered=1, element=0, dense=0, weights=n[2], stored=2 * d[2])


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_convs_of_mixed_dtypes_cluster_as_each_alone(granularity):
    """Session 55: a float64 conv beside float32 / float16 ones failed in the fixed-ratio and per-layer plans'
    one batched call ("x mixes dtypes"); each dtype now has its own call, each layer as when clustered alone."""
    torch.manual_seed(0)
    m = nn.ModuleDict({"a": nn.Conv2d(3, 8, 3).double(), "b": nn.Conv2d(8, 8, 3), "c": nn.Conv2d(8, 4, 1).half()})
    new, rep = compress(m, ratio=0.5, granularity=granularity, seed=0)
    assert [lr.name for lr in rep.layers] == ["a", "b", "c"]
    for n, dtype in zip("abc", (torch.float64, torch.float32, torch.float16)):
        alone, _ = compress(m, plan={"layers": {n: 0.5}}, granularity=granularity, seed=0)
        assert effective_weight(new[n]).dtype == dtype
        assert torch.equal(effective_weight(new[n]), effective_weight(alone[n])), n


def test_eval_data_is_checked_against_the_model_before_the_clustering():
    """Session 55: eval_data's labels past the outputs, float labels, images of the wrong dtype or shape failed
    after the clustering (its progress lines said so), though the docstring promises every argument checked
    first, as sensitivity_sweep does.  The pair is probed on two images; the caller's model stays as it was."""
    m = _net()
    x = _x(n=8)
    y = torch.randint(0, 6, (8,))
    m.train()
    before = copy.deepcopy(m.state_dict())
    for data, msg in [((x, y + 100), r"eval_data: labels must be in \[0, 6\)"),
                      ((x, y.float()), "eval_data: labels must be integer class indices"),
                      ((x.double(), y), "eval_data: images are torch.float64 but the model's parameters"),
                      ((x[:, 0], y), r"eval_data: images must be batches \[N, C, H, W\]")]:
        said = []
        with pytest.raises(ValueError, match=msg):
            compress(m, ratio=0.5, eval_data=data, progress=said.append)
        assert said == []
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
