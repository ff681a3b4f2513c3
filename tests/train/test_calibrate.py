"""Output-aware refit against the dense model: exact where the maths says it must be, never worse elsewhere."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kcengine
from kcengine.compress.layers import effective_weight
from kcengine.train import calibrate as cal
from kcengine.train import calibrate_outputs, recalibrate_bn
from kcengine.train.calibrate import following_batchnorm


def _images(n=32, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cosine", [False, True])
def test_pairs_of_scaled_and_negated_filters_are_recovered_exactly(kit, cosine):
    """conv2's 12 filters are 6 directions, each once as w and once as -2w: after BN (which absorbs scale and,
    through gamma's sign, negation) 6 centroids represent the layer exactly, although k-means on the weights
    cannot pair w with -2w.  The refit must find the pairing and reproduce the dense outputs, also with the
    cosine option, whose layer multiplies each filter's response by its norm."""
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    with torch.no_grad():
        base = torch.randn(6, 8, 3, 3)
        dense.conv2.weight.copy_(torch.cat([base, -2 * base])[torch.randperm(12)])
        dense.bn2.weight.uniform_(0.5, 1.5)
        dense.bn2.bias.uniform_(-0.5, 0.5)
    x = _images(64)
    recalibrate_bn(dense, x)  # dense BN statistics = the calibration data's, like the refit's
    cm, _ = kcengine.compress(dense, {"layers": {"conv2": 6}}, layers=["conv2"], cosine=cosine)
    assert (cm.conv2.scale is not None) == cosine
    with torch.no_grad():
        err_before = (cm(x) - dense(x)).abs().max().item()
    info = calibrate_outputs(cm, dense, x, iterations=20)
    assert info["conv2"]["explained_after"] == pytest.approx(1.0, abs=1e-3)  # ridge 1e-4 keeps it just below 1
    assert info["conv2"]["sign_flips"] > 0
    with torch.no_grad():
        err = (cm(x) - dense(x)).abs().max().item()
        scale = dense(x).abs().max().item()
    assert err < 2e-3 * scale, (err, scale)
    assert err_before > 50 * err
    # filters sharing a centroid: exactly 6 distinct
    assert len(torch.unique(cm.conv2.index)) == 6


@pytest.mark.parametrize("cosine", [False, True])
def test_refit_sets_the_bn_statistics_its_layers_outputs_have(kit, cosine):
    """The BN statistics the refit sets from the patch moments are those recalibrate_bn measures on the same
    images afterwards (one batch, every patch in the moments), with conv2's bias (cosine: in ``shift``) and the
    cosine option's per-filter norms in the outputs.  Cosine centroids stay unit-norm."""
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    dense.conv2 = torch.nn.Conv2d(8, 12, 3, padding=1, bias=True)
    with torch.no_grad():
        dense.conv2.bias.uniform_(-1.0, 1.0)
    x = _images(64)
    recalibrate_bn(dense, x)
    cm, _ = kcengine.compress(dense, ratio=0.5, cosine=cosine)
    assert (cm.conv1.scale is not None) == cosine and (cm.conv2.scale is not None) == cosine
    bias = cm.conv2.shift if cosine else cm.conv2.bias
    assert bias is not None and float(bias.detach().abs().min()) > 0
    assert set(calibrate_outputs(cm, dense, x)) == {"conv1", "conv2"}
    if cosine:
        for conv in (cm.conv1, cm.conv2):
            norms = conv.codebook.detach().reshape(conv.num_clusters, -1).norm(dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms))
    measured = recalibrate_bn(copy.deepcopy(cm), x, max_images=None)
    for bn in ("bn1", "bn2"):  # running_var is unbiased: n / (n - 1) = 4096 / 4095 above the moments'
        a, b = getattr(cm, bn), getattr(measured, bn)
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var * 4096 / 4095, b.running_var, rtol=2e-5, atol=1e-7)


def test_layers_fused_for_inference_are_left_alone(kit):
    """A layer with its BN folded in (or a ReLU) outputs what comes after the teacher's BN: the refit, which
    matches the conv's outputs, must not touch it."""
    dense, cm, x = _clustered_tiny(kit)
    cm.conv1 = cm.conv1.fuse_bn_relu(cm.bn1, relu=True)
    cm.conv2 = cm.conv2.fuse_bn_relu(cm.bn2, relu=False)
    cm.bn1, cm.bn2 = torch.nn.Identity(), torch.nn.Identity()
    before = copy.deepcopy(cm)
    assert calibrate_outputs(cm, dense, x) == {}
    assert _same_state(cm, before)


def test_refit_never_lowers_the_explained_variance(kit):
    dense, cm, x = _clustered_tiny(kit, 48)
    info = calibrate_outputs(cm, dense, x)
    assert set(info) == {"conv1", "conv2"}
    for name, r in info.items():
        assert r["explained_after"] >= r["explained_before"] - 1e-9, name
        assert 0 < r["explained_after"] <= 1 + 1e-9


@pytest.mark.parametrize("unused", [False, True])
def test_the_explained_variance_is_that_of_the_layers_outputs(kit, unused):
    """The refit's ``explained_before`` / ``explained_after`` are, by definition, the gamma^2-weighted mean over
    conv2's filters of the squared correlation between the clustered channel's output and the dense one's over
    the calibration images, the clustered variance ridged as the refit ridges it (``ridge`` x the mean variance
    of the input patches x the filter's squared norm).  Measured here from ``F.conv2d`` outputs before and after
    (the moments hold every patch): the refit computes them from C_out x C_out forms, not from these outputs.
    With ``unused``, one centroid starts without members (the refit's other path for a codebook)."""
    dense, cm, x = _clustered_tiny(kit, 48)
    if unused:
        cm.conv2.set_index(torch.arange(12) % (cm.conv2.num_clusters - 1))
    gw = dense.bn2.weight.detach().double() ** 2
    ridge = 1e-4

    def explained():
        with torch.no_grad():
            h = torch.relu(cm.bn1(cm.conv1(x)))  # conv2's input in the clustered model (conv1 is not refit)
            wc = effective_weight(cm.conv2).double()
            yc = F.conv2d(h.double(), wc, padding=1).transpose(0, 1).reshape(12, -1)
            yd = dense.conv2(torch.relu(dense.bn1(dense.conv1(x)))).double().transpose(0, 1).reshape(12, -1)
            patches = F.unfold(h.double(), 3, padding=1).transpose(1, 2).reshape(-1, wc[0].numel())
        n = yc.shape[1]
        yc, yd = yc - yc.mean(1, keepdim=True), yd - yd.mean(1, keepdim=True)
        r = ridge * (float(patches.var(0, unbiased=False).mean()) + 1e-12)
        var_c = (yc * yc).sum(1) / n + r * (wc.reshape(12, -1) ** 2).sum(1)
        r2 = ((yc * yd).sum(1) / n) ** 2 / (var_c * (yd * yd).sum(1) / n)
        return float((gw * r2).sum() / gw.sum())

    before = explained()
    info = calibrate_outputs(cm, dense, x, layers=["conv2"], ridge=ridge)["conv2"]
    assert info["explained_before"] == pytest.approx(before, abs=1e-5)
    assert info["explained_after"] == pytest.approx(explained(), abs=1e-5)
    assert info["explained_after"] > before + 0.01


def test_an_unused_centroid_takes_a_filter_and_the_refit_still_explains_more(kit):
    """A cluster without members (conv2's 12 filters spread over 5 of its 6 centroids) gets one from a cluster that
    keeps one: every centroid is used after the refit, which explains at least the variance it started from."""
    dense, cm, x = _clustered_tiny(kit, 48)
    k = cm.conv2.num_clusters
    cm.conv2.set_index(torch.arange(12) % (k - 1))
    info = calibrate_outputs(cm, dense, x)
    assert torch.bincount(cm.conv2.index.long(), minlength=k).min() >= 1
    assert info["conv2"]["explained_after"] >= info["conv2"]["explained_before"] - 1e-9


@pytest.mark.parametrize("cosine", [False, True])
def test_without_bn_least_squares_with_one_centroid_per_filter_gives_back_the_weights(kit, cosine):
    """(cosine: each filter is its norm, kept in ``scale``, times its centroid.)"""
    torch.manual_seed(0)
    dense = kit.TinyNet(bn=False).eval()
    x = _images(48)
    cm, _ = kcengine.compress(dense, {"layers": {"conv2": 12}}, layers=["conv2"], cosine=cosine)
    with torch.no_grad():
        cm.conv2.codebook.mul_(0.3)  # spoil it; the refit has to find the weights again
    calibrate_outputs(cm, dense, x)
    torch.testing.assert_close(effective_weight(cm.conv2), dense.conv2.weight, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), dense(x), atol=1e-4, rtol=1e-4)


def test_without_bn_cosine_centroids_are_the_least_squares_fit_of_their_members(kit):
    """Clusters of several filters, each filter its norm (``scale``) times the centroid: the refit's codebook is
    the centroid whose scaled responses best match the dense filters' on the calibration patches, computed
    here by a direct least-squares solve over the members' stacked patch responses."""
    torch.manual_seed(0)
    dense = kit.TinyNet(bn=False).eval()
    x = _images(48)
    cm, _ = kcengine.compress(dense, {"layers": {"conv2": 4}}, layers=["conv2"], cosine=True)
    assert len(torch.unique(cm.conv2.index)) == 4 and cm.conv2.index.bincount().max() > 1
    calibrate_outputs(cm, dense, x, ridge=0.0)
    with torch.no_grad():
        inp = torch.relu(dense.conv1(x))
    p = F.unfold(inp, 3, padding=1).transpose(1, 2).reshape(-1, 72).double()  # every patch of conv2's input
    w = dense.conv2.weight.detach().double().reshape(12, -1)
    s = cm.conv2.scale.detach().double()
    for j in range(4):
        members = (cm.conv2.index == j).nonzero()[:, 0]
        a = torch.cat([s[o] * p for o in members])  # rows: s_o * patch, target: the dense filter's response
        t = torch.cat([p @ w[o] for o in members])
        want = torch.linalg.lstsq(a, t[:, None]).solution[:, 0]
        got = cm.conv2.codebook.detach().double().reshape(4, -1)[j]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_following_batchnorm_finds_conv_bn_pairs(kit):
    m = kit.TinyNet()
    pairs = following_batchnorm(m, _images(2))
    assert pairs == {"conv1": m.bn1, "conv2": m.bn2}
    assert following_batchnorm(kit.TinyNet(bn=False), _images(2)) == {}
    m.train()
    before = copy.deepcopy(m.state_dict())
    following_batchnorm(m, _images(2) * 5 + 3)  # a training-mode model: its BN statistics stay as they were
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_calibrate_checks_inputs(kit):
    m = kit.TinyNet()
    with pytest.raises(ValueError, match="images must be"):
        calibrate_outputs(m, m, torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="iterations must be"):
        calibrate_outputs(m, m, _images(2), iterations=-1)
    # session 55: these ended in "could not be factored ... use more calibration images", torch's manual_seed
    # error, or ran (max_patches=2.5 fit two patches)
    for kw, msg in [(dict(ridge=-1.0), "ridge must be a finite number >= 0"), (dict(ridge=float("nan")), "ridge="),
                    (dict(ridge="a"), "ridge="), (dict(max_patches=0), "max_patches must be an int >= 1"),
                    (dict(max_patches=2.5), "max_patches="), (dict(seed=1.5), "seed must be an int"),
                    (dict(seed="x"), "seed="), (dict(lockstep="no"), "lockstep must be True or False")]:
        with pytest.raises(ValueError, match=msg):
            calibrate_outputs(m, m, _images(2), **kw)
    assert calibrate_outputs(m, m, _images(2), iterations=np.int64(2), batch_size=np.int32(8)) == {}


def test_layers_are_selected_as_compress_selects_them(kit):
    """Session 55: a string was matched as a substring ("layer1.0.conv1" also refit "conv1"), and a misspelt name
    was skipped without a word.  Now a string is a full-match regex and every listed name must be a conv."""
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    x = _images(48)
    cm, _ = kcengine.compress(dense, ratio=0.5)
    for layers, refit in [("conv2", {"conv2"}), (".*2", {"conv2"}), (["conv1"], {"conv1"}), ("first", {"conv1"}),
                          (None, {"conv1", "conv2"})]:
        assert set(calibrate_outputs(copy.deepcopy(cm), dense, x, layers=layers)) == refit, layers
    with pytest.raises(ValueError, match=r"layers names \['cnv2'\] which are not conv layers"):
        calibrate_outputs(cm, dense, x, layers=["conv1", "cnv2"])
    with pytest.raises(ValueError, match="matches no conv layer"):
        calibrate_outputs(cm, dense, x, layers="onv2")  # a substring of conv2: no longer selects it


def test_a_bn_without_affine_parameters_gets_the_least_squares_refit(kit):
    """Session 55: a BatchNorm2d(affine=False) after the conv took the BN refit, whose sign flips it cannot apply
    (no gamma): the flipped channels came out negated (MSE against the dense model 0.85 -> 2.0).  As the module
    docstring says, such a layer keeps its index and gets the least-squares codebook."""
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    dense.bn2 = torch.nn.BatchNorm2d(12, affine=False).eval()
    with torch.no_grad():
        base = torch.randn(6, 8, 3, 3)
        dense.conv2.weight.copy_(torch.cat([base, -2 * base])[torch.randperm(12)])
    x = _images(64)
    recalibrate_bn(dense, x)
    cm, _ = kcengine.compress(dense, {"layers": {"conv2": 6}}, layers=["conv2"])
    idx = cm.conv2.index.clone()
    with torch.no_grad():
        before = (cm(x) - dense(x)).pow(2).mean().item()
    info = calibrate_outputs(cm, dense, x, iterations=20)
    with torch.no_grad():
        after = (cm(x) - dense(x)).pow(2).mean().item()
    assert info["conv2"]["sign_flips"] == 0 and torch.equal(cm.conv2.index, idx)
    assert after <= before * 1.01, (before, after)  # (the ridge moves it a little)
    # the least-squares codebook of an unchanged index on the dense input is the members' mean filter
    w = dense.conv2.weight.detach().double().reshape(12, -1)
    want = torch.stack([w[idx == j].mean(0) for j in range(6)])
    got = cm.conv2.codebook.detach().double().reshape(6, -1)
    assert torch.allclose(got, want, atol=1e-3 * float(w.abs().max()))  # (to the ridge)


def test_a_teacher_that_is_not_the_dense_counterpart_is_refused(kit):
    """The refit matches each clustered layer to the teacher's conv of the same name: a teacher of another
    architecture was matched wherever names agreed (a resnet32 for a resnet20: its first blocks), silently.
    Now its conv layers must be the student's, by name and shape, and what differs is named."""
    from kcengine.models import cifar_resnet
    from kcengine.train.calibrate import layer_mismatch

    torch.manual_seed(0)
    r20 = cifar_resnet(20).eval()
    small, _ = kcengine.compress(r20, ratio=0.5, layers=r"layer1\..*")
    assert layer_mismatch(small, r20) is None  # dense and clustered layers alike
    before = copy.deepcopy(small)
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"teacher must be the dense model the student was clustered from \(the "
                                         r"same conv layers\): only the teacher has layer1\.3\.conv1, "
                                         r"layer1\.3\.conv2, layer1\.4\.conv1, \.\.\. \(12 in all\)"):
        calibrate_outputs(small, cifar_resnet(32).eval(), x)
    assert _same_state(small, before)
    other = copy.deepcopy(r20)
    other.layer2[0].conv1.stride = (1, 1)
    assert layer_mismatch(small, other) == "layer 'layer2.0.conv1' has stride=(2, 2) in the student and (1, 1) " \
                                           "in the teacher"
    dense, cm, _ = _clustered_tiny(kit)
    assert layer_mismatch(cm, r20).startswith("only the student has conv2; only the teacher has layer1.0.conv1")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, in the reference
@pytest.mark.parametrize("make", [lambda: torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect", bias=False),
                                  lambda: torch.nn.Conv2d(3, 5, (4, 2), padding="same", bias=False),
                                  lambda: torch.nn.Conv2d(3, 5, 2, padding="same", dilation=(1, 3),
                                                          padding_mode="circular", bias=False),
                                  lambda: torch.nn.Conv2d(3, 5, 3, stride=2, padding=(0, 2), bias=False)])
def test_patch_moments_are_the_windows_the_layer_convolves(make):
    """The refit's patch moments, of a clustered layer or of the dense conv (the output sensitivity passes
    those), against the conv's own forward: ``W Ecc W^T`` is the mean square of each output channel and
    ``W mean`` its mean.  (A dense conv with a padding mode failed there: it has no padding_extra.)"""
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(6, 3, 9, 11)
    with torch.no_grad():
        y = conv(x).double()
    w = conv.weight.detach().reshape(5, -1).double()
    for layer in (conv, kcengine.nn.ClusteredConv2d.from_conv(conv, 5)):  # K = C_out: the filters themselves
        ecc, _, _, mean, _ = cal._moments(layer, x, x, max_patches=10 ** 9, seed=0)
        torch.testing.assert_close(torch.einsum("od,de,oe->o", w, ecc, w), (y ** 2).mean((0, 2, 3)))
        torch.testing.assert_close(w @ mean, y.mean((0, 2, 3)))


def _clustered_tiny(kit, n=40):
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    x = _images(n)
    recalibrate_bn(dense, x)
    cm, _ = kcengine.compress(dense, ratio=0.5)
    return dense, cm, x


def _same_state(a, b):
    return all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values()))


def _counting_layer_input(monkeypatch):
    calls = []
    real = cal._layer_input
    monkeypatch.setattr(cal, "_layer_input", lambda *args: calls.append(args) or real(*args))
    return calls


def _both_paths(student, teacher, x, monkeypatch, **kw):
    """(result, model) of the default (lockstep where it can) run and of the per-layer forwards, and how
    many per-layer forwards the first ran."""
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    calls = _counting_layer_input(monkeypatch)
    info_a = calibrate_outputs(a, teacher, x, **kw)
    n_calls = len(calls)
    info_b = calibrate_outputs(b, teacher, x, lockstep=False, **kw)
    return (info_a, a), (info_b, b), n_calls


def test_lockstep_run_refits_exactly_as_forwards_up_to_each_layer(kit, monkeypatch):
    """Traceable models run once, student and teacher in lockstep (no forward per layer), and get the very
    codebooks, indices and BN statistics of the per-layer forwards, over several calibration chunks."""
    dense, cm, x = _clustered_tiny(kit)
    cm.train()
    (info_a, a), (info_b, b), n_calls = _both_paths(cm, dense, x, monkeypatch, batch_size=16)  # 16, 16, 8
    assert n_calls == 0 and set(info_a) == {"conv1", "conv2"}
    assert a.training and not dense.training  # flags restored
    assert info_a == info_b and _same_state(a, b)
    assert not _same_state(a, cm)  # the refit did change the model


def test_lockstep_runs_in_place_residual_adds_as_the_forwards_do(monkeypatch):
    """torchvision's BasicBlock adds its shortcut in place (`out += identity`), which the tracer records as
    operator.iadd since fuse's in-place fix: the lockstep run executes those writes node by node, and must
    still refit every layer exactly as the per-layer forwards (eager modules) do."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), BasicBlock(16, 16), BasicBlock(16, 16),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    for m in dense.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    dense.eval()
    x = torch.randn(24, 3, 12, 12)
    cm, _ = kcengine.compress(dense, 0.5, seed=0)
    (info_a, a), (info_b, b), n_calls = _both_paths(cm.eval(), dense, x, monkeypatch)
    assert n_calls == 0 and len(info_a) == 5  # every conv refit, in one lockstep run
    assert info_a == info_b and _same_state(a, b)
    assert not _same_state(a, cm)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_ridged_cholesky_grows_the_ridge_only_where_the_moments_need_it():
    """Few calibration patches give an input covariance of low rank whose float32 rounding leaves eigenvalues
    of about -1e-7 x the largest: the relative ridge (1e-4 x the MEAN variance) fell below that on resnet18's
    layer4 with 4 images of 32x32 and torch.linalg.cholesky raised.  The ridge now grows tenfold until the
    factorization succeeds; a well-conditioned matrix keeps exactly the old ridge."""
    torch.manual_seed(0)
    dim = 400
    a = torch.randn(dim, 3, dtype=torch.float64) * 10
    noise = torch.randn(dim, dim, dtype=torch.float64) * 1e-2  # eigenvalues to -0.28: 7e-6 of the largest
    skewed = a @ a.T + 0.5 * (noise + noise.T)
    old = skewed + 1e-4 * (torch.trace(skewed) / dim + 1e-12) * torch.eye(dim, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(old)[1]) != 0  # the old single try fails here
    s_r, chol = cal._ridged_cholesky(skewed, 1e-4)
    torch.testing.assert_close(chol @ chol.T, s_r, rtol=1e-10, atol=1e-9)
    assert torch.equal(s_r - skewed, torch.diag(torch.diagonal(s_r - skewed)))  # only the diagonal grew
    good = a @ a.T + torch.eye(dim, dtype=torch.float64)
    s_r, chol = cal._ridged_cholesky(good, 1e-4)
    assert torch.equal(s_r, good + 1e-4 * (torch.trace(good) / dim + 1e-12) * torch.eye(dim, dtype=torch.float64))
    assert torch.equal(chol, torch.linalg.cholesky(s_r))


def _variant(kit, forward, dense, cm):
    """TinyNet-shaped dense and clustered models with another forward (same weights)."""
    cls = type("Variant", (kit.TinyNet,), {"forward": forward})
    d, c = cls().eval(), cls().eval()
    d.load_state_dict(dense.state_dict())
    c.conv1, c.bn1, c.conv2, c.bn2, c.linear = copy.deepcopy((cm.conv1, cm.bn1, cm.conv2, cm.bn2, cm.linear))
    return d, c


def test_lockstep_traces_in_eval_mode(kit, monkeypatch):
    """A forward that reads self.training (dropout) is traced in eval mode, as the per-layer forwards run."""
    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.dropout(x, 0.5, self.training)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean((2, 3)))

    dense, cm, x = _clustered_tiny(kit)
    d, c = _variant(kit, forward, dense, cm)
    c.train()
    (info_a, a), (info_b, b), n_calls = _both_paths(c, d, x, monkeypatch)
    assert n_calls == 0 and info_a == info_b and _same_state(a, b)


def test_untraceable_or_hooked_models_take_the_per_layer_path(kit, monkeypatch):
    def branchy(self, x):
        if float(x.abs().max()) > 1e30:  # data-dependent control flow: torch.fx cannot trace it
            x = x / 2
        return kit.TinyNet.forward(self, x)

    def runs_differently(self, x):  # traces (a Proxy is no Tensor), then fails when the graph runs
        if not isinstance(x, torch.Tensor):
            x = x.no_such_method()
        return kit.TinyNet.forward(self, x)

    dense, cm, x = _clustered_tiny(kit)
    ref = copy.deepcopy(cm)
    ref_info = calibrate_outputs(ref, dense, x, lockstep=False)
    calls = _counting_layer_input(monkeypatch)
    for forward in (branchy, runs_differently):
        d, c = _variant(kit, forward, dense, cm)
        calls.clear()
        assert calibrate_outputs(c, d, x) == ref_info and _same_state(c, ref), forward.__name__
        assert len(calls) == 4  # both models, both layers
    hooked = copy.deepcopy(cm)
    hooked.register_forward_pre_hook(lambda m, inp: (inp[0] * 3 + 1,))  # the graph would not run it
    (info_a, a), (info_b, b), n_calls = _both_paths(hooked, dense, x, monkeypatch)
    assert n_calls == 4 and info_a == info_b and _same_state(a, b)


def test_tracing_leaves_both_models_as_they_were(kit, monkeypatch):
    """Tensor constants of a forward are hoisted by tracing into attributes of the model: taken back off."""
    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x))) * torch.tensor(0.75)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean((2, 3)))

    dense, cm, x = _clustered_tiny(kit)
    d, c = _variant(kit, forward, dense, cm)
    d_attrs, d_state = set(vars(d)), copy.deepcopy(d.state_dict())
    (info_a, a), (info_b, b), n_calls = _both_paths(c, d, x, monkeypatch)
    assert n_calls == 0 and info_a == info_b and _same_state(a, b)
    assert set(vars(d)) == d_attrs and set(vars(a)) == set(vars(c))
    assert all(torch.equal(v, d_state[k]) for k, v in d.state_dict().items())


@pytest.mark.parametrize("c,h,w,k,dil,pad,st", [(3, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
                                                (6, 9, 7, (3, 3), (1, 1), (1, 1), (2, 2)),
                                                (5, 11, 9, (3, 1), (2, 1), (2, 0), (1, 2)),
                                                (4, 8, 8, (1, 1), (1, 1), (0, 0), (2, 2))])
def test_patch_rows_are_the_unfolded_rows(c, h, w, k, dil, pad, st):
    """The moments gather their sampled patches straight from the input: the same rows as im2col's."""
    x = torch.randn(5, c, h, w, generator=torch.Generator().manual_seed(2))
    kw = dict(kernel_size=k, dilation=dil, padding=pad, stride=st)
    full = F.unfold(x, **kw).transpose(1, 2).reshape(-1, c * k[0] * k[1])
    rows = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(3))[: full.shape[0] // 3 + 1]
    assert torch.equal(cal._patch_rows(x, rows, **kw), full[rows])


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_moments_pad_as_the_layer_pads(mode):
    """A layer with a padding mode: the refit's patch moments are those of its input padded that way."""
    from kcengine.nn import ClusteredConv2d

    layer = ClusteredConv2d(3, 4, 3, 2, stride=2, padding=(1, 2), padding_mode=mode)
    g = torch.Generator().manual_seed(4)
    xc, xd = torch.randn(6, 3, 9, 8, generator=g), torch.randn(6, 3, 9, 8, generator=g)
    got = cal._moments(layer, xc, xd, max_patches=10**6, seed=0)

    def patches(x):
        return F.unfold(F.pad(x, (2, 2, 1, 1), mode=mode), 3, stride=2).transpose(1, 2).reshape(-1, 27).double()

    pc, pd = patches(xc), patches(xd)
    n = pc.shape[0]
    want = (pc.T @ pc / n, pc.T @ pd / n, pd.T @ pd / n, pc.mean(0), pd.mean(0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lockstep", [True, False])
def test_every_submodule_keeps_its_own_mode(kit, lockstep):
    """calibrate_outputs, recalibrate_bn and output_sensitivity restored only the top module's flag
    (model.train(was)), which set every submodule to it: a BN frozen in a training model came back training."""
    from kcengine.train import output_sensitivity

    dense, cm, x = _clustered_tiny(kit)

    def mixed(m):
        m.train()
        m.bn1.eval()  # frozen statistics in a training model
        return [mod.training for mod in m.modules()]

    teacher_modes, student_modes = mixed(dense), mixed(cm)
    calibrate_outputs(cm, dense, x, lockstep=lockstep)
    assert [mod.training for mod in cm.modules()] == student_modes
    assert [mod.training for mod in dense.modules()] == teacher_modes
    recalibrate_bn(cm, x)
    assert [mod.training for mod in cm.modules()] == student_modes
    output_sensitivity(dense, x[:16], x[16:], ratios=(0.5,))
    assert [mod.training for mod in dense.modules()] == teacher_modes


def test_recalibrate_bn_puts_the_statistics_back_when_the_pass_fails(kit):
    """A pass that failed partway left every BN reset (mean 0, variance 1); a bad device was torch's error."""
    torch.manual_seed(0)
    m = kit.TinyNet().eval()
    m.bn1.running_mean.normal_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError):
        recalibrate_bn(m, torch.randn(4, 5, 8, 8))  # 5 channels: the first conv fails
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="device must be a torch device"):
        recalibrate_bn(m, torch.randn(4, 3, 8, 8), device="tpu")


def test_recalibrate_bn_reads_a_pair_as_images_and_labels_only(kit):
    """``[x1, x2]`` (two image batches) was read as (images, labels): the statistics came from x1 alone."""
    torch.manual_seed(0)
    m = kit.TinyNet().eval()
    x = torch.randn(12, 3, 8, 8)
    want = recalibrate_bn(copy.deepcopy(m), x).state_dict()
    got = recalibrate_bn(copy.deepcopy(m), (x, torch.zeros(12, dtype=torch.long))).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for pair in ([x[:6], x[6:]], (x, torch.zeros(11, dtype=torch.long)), (x, [0] * 12)):
        with pytest.raises(ValueError, match="read as \\(images, labels\\): labels must be a 1-D tensor of"):
            recalibrate_bn(m, pair)
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
