"""FGSM / PGD against an independent numpy reference (a linear softmax model, whose input gradient has a
closed form), their box and validity properties, and clustered models attacked like their dense twins."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import kcengine
from kcengine.evaluate import adversarial_accuracy, adversarial_examples, evaluate
from kcengine.nn import ClusteredConv2d

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _images(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pix = torch.randint(0, 256, (n, 3, 6, 5), generator=g).to(dtype) / 255
    m, s = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1), torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1)
    return pix, (pix - m) / s, torch.randint(0, 4, (n,), generator=g)


def _np_grad_pixels(W, b, pix, y):
    """d CE / d pixels of logits = W @ ((pix - mean) / std).flatten() + b, in numpy."""
    m, s = np.array(MEAN).reshape(1, 3, 1, 1), np.array(STD).reshape(1, 3, 1, 1)
    z = ((pix - m) / s).reshape(len(pix), -1)
    logits = z @ W.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return (p @ W).reshape(pix.shape) / s


def _linear():
    torch.manual_seed(0)
    lin = nn.Linear(3 * 6 * 5, 4).double()
    return nn.Sequential(nn.Flatten(), lin), lin.weight.detach().numpy(), lin.bias.detach().numpy()


def _pixels(x):
    m, s = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1), torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return x * s + m


def test_fgsm_and_pgd_match_the_numpy_reference():
    model, W, b = _linear()
    pix, x, y = _images()
    eps = 3 / 255
    ref = np.clip(pix.numpy() + eps * np.sign(_np_grad_pixels(W, b, pix.numpy(), y.numpy())), 0, 1)
    got = adversarial_examples(model, x, y, mean=MEAN, std=STD, eps=eps, attack="fgsm")
    np.testing.assert_allclose(_pixels(got).numpy(), ref, atol=1e-12)
    # PGD without a random start: signed steps of 1/255, each projected into the box and [0, 1]
    adv = pix.numpy().copy()
    for _ in range(5):
        adv = adv + (1 / 255) * np.sign(_np_grad_pixels(W, b, adv, y.numpy()))
        adv = np.clip(np.clip(adv, pix.numpy() - eps, pix.numpy() + eps), 0, 1)
    got = adversarial_examples(model, x, y, mean=MEAN, std=STD, eps=eps, attack="pgd", steps=5, step_size=1 / 255,
                               random_start=False)
    np.testing.assert_allclose(_pixels(got).numpy(), adv, atol=1e-12)
    assert not np.allclose(adv, ref)  # the two attacks really differ here


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def _trained_net():
    torch.manual_seed(1)
    net = _Net().double()
    _, x, y = _images(64, seed=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(30):  # enough that it classifies some images right, so the attack has something to undo
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), x, y


def test_pgd_stays_in_the_box_and_is_reproducible_and_leaves_the_model_alone():
    net, x, y = _trained_net()
    net.train()  # the caller's mode comes back
    before = copy.deepcopy(net.state_dict())
    for p in net.parameters():
        p.grad = None
    r = adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, eps=0.1, steps=7, batch_size=20, seed=3)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    clean = evaluate(net, (x, y))
    assert r.clean_top1 == clean.top1 and r.total == 64 and r.steps == 7
    assert r.robust_top1 < r.clean_top1  # the attack flips some correct answers
    again = adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, eps=0.1, steps=7, batch_size=20, seed=3)
    assert (again.correct_robust, again.correct_clean) == (r.correct_robust, r.correct_clean)
    net.eval()
    pix = _pixels(x)
    for attack in ("fgsm", "pgd"):
        adv = _pixels(adversarial_examples(net, x, y, mean=MEAN, std=STD, eps=4 / 255, attack=attack,
                                           steps=3 if attack == "pgd" else None,
                                           generator=torch.Generator().manual_seed(0)))
        assert (adv - pix).abs().max() <= 4 / 255 + 1e-12 and adv.min() >= 0 and adv.max() <= 1
        assert (adv - pix).abs().max() > 3.9 / 255  # and uses it
    zero = adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, eps=0.0)
    assert zero.robust_top1 == zero.clean_top1


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_clustered_model_is_attacked_like_its_dense_twin(granularity):
    net, x, y = _trained_net()
    small, _ = kcengine.compress(net, ratio=0.5, granularity=granularity, seed=0)
    assert sum(isinstance(m, ClusteredConv2d) for m in small.modules()) == 2
    twin = copy.deepcopy(net)  # plain nn.Conv2d layers holding each clustered layer's dense weight
    for name in ("conv1", "conv2"):
        layer = getattr(small, name)
        conv = getattr(twin, name)
        with torch.no_grad():
            conv.weight.copy_(layer.to_dense())
    for attack in ("fgsm", "pgd"):
        kw = dict(mean=MEAN, std=STD, eps=2 / 255, attack=attack, steps=4 if attack == "pgd" else None)
        got = adversarial_examples(small.eval(), x, y, generator=torch.Generator().manual_seed(0), **kw)
        want = adversarial_examples(twin.eval(), x, y, generator=torch.Generator().manual_seed(0), **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


class _LabelReader(nn.Module):
    """Predicts class c when pixel [0, 0, 0] is c/4 (in [0, 1] pixel units): its answers are set by the images."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        v = x[:, 0, 0, 0] * STD[0] + MEAN[0]
        return -self.scale * (v[:, None] - torch.arange(4, dtype=x.dtype) / 4).abs()


def _encode(pix, labels):
    pix = pix.clone()
    pix[:, 0, 0, 0] = labels.to(pix.dtype) / 4
    m, s = torch.tensor(MEAN, dtype=pix.dtype).view(1, 3, 1, 1), torch.tensor(STD, dtype=pix.dtype).view(1, 3, 1, 1)
    return (pix - m) / s


def test_robust_needs_both_answers_right_and_every_module_mode_comes_back(monkeypatch):
    import kcengine.evaluate.robustness as rb

    pix, _, y = _images(16)
    wrong = (y + 1) % 4
    half = torch.arange(16) % 2 == 0
    x = _encode(pix, torch.where(half, y, wrong))  # right as given on the even images only
    model = nn.Sequential(_LabelReader(), nn.Identity())
    model.train()
    model[1].eval()
    # an "attack" that makes the model right everywhere: robust still counts only the images right as given
    monkeypatch.setattr(rb, "adversarial_examples", lambda m, xb, yb, **kw: _encode(_pixels(xb), yb))
    r = adversarial_accuracy(model, (x, y), mean=MEAN, std=STD, eps=0.1, batch_size=5)
    assert (r.correct_clean, r.correct_robust, r.total) == (8, 8, 16)
    assert model.training and model[0].training and not model[1].training


def test_random_start_and_seed_matter():
    net, x, y = _trained_net()
    kw = dict(mean=MEAN, std=STD, eps=8 / 255, attack="pgd", steps=2)
    a = adversarial_examples(net, x, y, generator=torch.Generator().manual_seed(0), **kw)
    b = adversarial_examples(net, x, y, generator=torch.Generator().manual_seed(1), **kw)
    c = adversarial_examples(net, x, y, random_start=False, **kw)
    d = adversarial_examples(net, x, y, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, d) and not torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_name_the_value():
    net, x, y = _trained_net()
    for kw, msg in [(dict(attack="cw"), "attack must be one of"), (dict(eps=-0.1), "eps must be a number in"),
                    (dict(eps=8), "got eps=8"), (dict(steps=0), "steps must be an int >= 1 or None, got steps=0"),
                    (dict(step_size=0), "step_size must be"), (dict(std=(1, 0, 1)), "std > 0")]:
        args = {"mean": MEAN, "std": STD, **kw}
        with pytest.raises(ValueError, match=msg):
            adversarial_accuracy(net, (x, y), **args)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got batch_size=0"):
        adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, batch_size=0)
    # (these three were a TypeError, torch's IndexError and torch's RuntimeError)
    with pytest.raises(ValueError, match="mean must be a sequence of finite numbers, one per channel, got mean=None"):
        adversarial_accuracy(net, (x, y), mean=None, std=STD)
    y_bad = y.clone()
    y_bad[0] = 99
    with pytest.raises(ValueError, match=r"labels must be in \[0, \d+\) \(the model's outputs\), got values in \[\d+, 99\]"):
        adversarial_accuracy(net, (x, y_bad), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype torch.float32"):
        adversarial_accuracy(net, (x, y.float()), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 9223372036854775807\], got seed=-1"):
        adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, seed=-1)
    with pytest.raises(ValueError, match="device must be a torch device .* got device='tpu'"):
        adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, device="tpu")
    with pytest.raises(ValueError, match="step_size is PGD's"):
        adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, attack="fgsm", step_size=0.01)
    with pytest.raises(ValueError, match="C = len\\(mean\\) = 4, got shape \\(64, 3, 6, 5\\)"):
        adversarial_accuracy(net, (x, y), mean=MEAN + (0.5,), std=STD + (0.5,))
    with pytest.raises(ValueError, match="not \\[0, 1\\]: pass the normalization"):
        adversarial_accuracy(net, (x * 5, y), mean=MEAN, std=STD)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        adversarial_accuracy(net, (x, y), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="steps is PGD's"):
        adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, attack="fgsm", steps=5)
    # session 46: NaN statistics scored every attacked image NaN; an infinite step made NaN pixels; a label of
    # -100 meant "no attack" (cross-entropy's ignore index); int32 labels and float64 images failed in torch
    nan3 = (float("nan"),) * 3
    for kw, msg in [(dict(std=nan3), "std must be a sequence of finite numbers"),
                    (dict(mean=nan3), "mean must be a sequence of finite numbers"),
                    (dict(step_size=float("inf")), "step_size must be a finite number > 0"),
                    (dict(random_start="no"), "random_start must be True or False"),
                    (dict(seed=2**64), "seed must be an int in")]:
        with pytest.raises(ValueError, match=msg):
            adversarial_accuracy(net, (x, y), **{"mean": MEAN, "std": STD, **kw})
    with pytest.raises(ValueError, match=r"labels must be in \[0, \d+\) .* got values in \[-100, "):
        adversarial_examples(net, x, torch.full_like(y, -100), mean=MEAN, std=STD, eps=8 / 255)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got str"):
        adversarial_examples(net, x, y, mean=MEAN, std=STD, eps=8 / 255, generator="abc")
    with pytest.raises(ValueError, match="images are torch.float32 but the model's parameters are torch.float64"):
        adversarial_accuracy(net, (x.float(), y), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="model must be an nn.Module, got NoneType"):
        adversarial_accuracy(None, (x, y), mean=MEAN, std=STD)
    a = adversarial_accuracy(net, (x, y.int()), mean=MEAN, std=STD, steps=2)
    b = adversarial_accuracy(net, (x, y), mean=torch.tensor(MEAN).view(3, 1, 1), std=np.array(STD), steps=2)
    assert (a.correct_clean, a.correct_robust) == (b.correct_clean, b.correct_robust)
    r = adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, eps=np.float32(32 / 255), steps=np.int64(2))
    assert type(r.steps) is int and r.steps == 2 and abs(r.eps - 32 / 255) < 1e-8
    assert r.label() == "PGD-2, eps 32/255" and json.loads(json.dumps(r.as_dict()))["steps"] == 2
    assert adversarial_accuracy(net, (x, y), mean=MEAN, std=STD, eps=0.01).steps == 10  # PGD's default


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_images_are_attacked_within_the_budget(dtype):
    """Session 55: the pixel maths ran in the images' own dtype, so float16 and bfloat16 attacks left the eps
    box by up to a fifth of 1/255 (eps=0 moved pixels too), and bfloat16 images of exact pixels could be
    refused as "not [0, 1]".  The box is now kept in float32 and only the returned images are rounded, once:
    each pixel moves at most eps plus half a unit in the last place of the normalized images."""
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
    net = _trained_net()[0].to(dtype)
    pix, _, y = _images(64, seed=5)
    m, s = torch.tensor(mean, dtype=pix.dtype).view(1, 3, 1, 1), torch.tensor(std, dtype=pix.dtype).view(1, 3, 1, 1)
    x = ((pix - m) / s).to(dtype)
    xpix = x.double() * s + m  # what the rounded images hold
    half_ulp = torch.finfo(dtype).eps / 2 * float(x.double().abs().max()) * max(std)
    for attack in ("fgsm", "pgd"):
        for eps in (1 / 255, 4 / 255):
            adv = adversarial_examples(net, x, y, mean=mean, std=std, eps=eps, attack=attack,
                                       steps=3 if attack == "pgd" else None,
                                       generator=torch.Generator().manual_seed(0))
            assert adv.dtype == dtype and adv.shape == x.shape
            moved = (adv.double() * s + m - xpix).abs().max().item()
            assert eps < moved <= eps + half_ulp + 1e-7, (attack, eps * 255, moved * 255)
    r = adversarial_accuracy(net, (x, y), mean=mean, std=std, eps=2 / 255, steps=2)
    assert r.total == 64 and r.correct_robust <= r.correct_clean


def test_eps_zero_returns_the_images_and_still_checks_the_labels():
    net, x, y = _trained_net()
    adv = adversarial_examples(net, x, y, mean=MEAN, std=STD, eps=0)
    assert torch.equal(adv, x) and adv is not x
    # session 55: eps=0 returned before the labels were looked at, which every eps > 0 refuses
    with pytest.raises(ValueError, match=r"labels must be in \[0, \d+\) .* got values in \[\d+, 5\d\]"):
        adversarial_examples(net, x, y + 50, mean=MEAN, std=STD, eps=0)
    with pytest.raises(ValueError, match="labels"):
        adversarial_examples(net, x, y[:3], mean=MEAN, std=STD, eps=0)


def test_eps_of_any_real_type_and_models_without_a_gradient_path():
    from fractions import Fraction

    net, x, y = _trained_net()
    # a Fraction passed the check and then failed in torch ("unsupported operand type(s) for *")
    gen = (lambda: torch.Generator().manual_seed(0))
    a = adversarial_examples(net, x, y, mean=MEAN, std=STD, eps=Fraction(2, 255), step_size=Fraction(1, 255),
                             generator=gen())
    b = adversarial_examples(net, x, y, mean=MEAN, std=STD, eps=2 / 255, step_size=1 / 255, generator=gen())
    assert torch.equal(a, b)

    class Detached(nn.Module):  # logits that do not depend on the images through autograd
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(z.detach())

    class Ignores(nn.Module):  # logits from parameters only
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, dtype=torch.float64))

        def forward(self, z):
            return self.w.expand(z.shape[0], 4)

    for model in (Detached(net), Ignores()):  # torch's message was "... Set allow_unused=True ..."
        with pytest.raises(ValueError, match="no gradient path to x"):
            adversarial_accuracy(model, (x, y), mean=MEAN, std=STD, steps=2)
