import sys

import numpy as np
import torch
from torch import nn

from kcengine.data import cifar10_dataset, synthetic_images
from kcengine.evaluate import confusion_png, evaluate, top1_accuracy
from kcengine.models import CifarResNet, load_model


class _Fixed(nn.Module):
    """Returns given logits per image index (stored in the first pixel)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_metrics_against_hand_count(tmp_path):
    logits = torch.tensor([[5., 4, 3, 2, 1, 0], [0, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 9], [9, 0, 0, 0, 0, 1]])
    x = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([0, 2, 0, 3])
    r = evaluate(_Fixed(logits), (x, y), batch_size=3, progress=True)
    # predictions: 0, 1, 5, 0 -> top1 correct: image 0 only
    assert r.correct == 1 and r.total == 4 and r.top1 == 0.25
    # top5: img0 yes; img1 label 2 in top5 (1,2,3,4,5) yes; img2 label 0 ranks last -> no; img3 label 3 tie
    top5 = logits.topk(5, 1).indices
    assert r.top5 == float((top5 == y[:, None]).any(1).float().mean())
    assert r.confusion[0, 0] == 1 and r.confusion[2, 1] == 1 and r.confusion[0, 5] == 1 and r.confusion[3, 0] == 1
    assert r.confusion.sum() == 4
    assert r.per_class[0] == 0.5 and r.per_class[2] == 0 and np.isnan(r.per_class[1])
    png = confusion_png(r.confusion, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_writers_leave_matplotlib_as_it_was(tmp_path):
    """The PNG writers used pyplot after matplotlib.use("Agg"): that switched the process's backend (a
    notebook's inline plots went blank after a finetune wrote its curves).  They now draw standalone figures:
    the backend and pyplot's open figures stay as they were.  confusion_png also takes an EvalResult (it
    raised IndexError) and names a matrix that is not square."""
    import matplotlib
    import pytest

    from kcengine.evaluate.metrics import EvalResult
    from kcengine.train.plots import plot_history

    original = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend that is not Agg (the user's, say), to see that it stays
    try:
        r = evaluate(_Fixed(torch.eye(3)), (torch.arange(3).float().view(3, 1, 1, 1), torch.tensor([0, 1, 1])))
        assert isinstance(r, EvalResult)
        for png in (confusion_png(r, tmp_path / "a.png"),
                    confusion_png(r.confusion, tmp_path / "b.png", classes="xyz"),
                    plot_history([{"phase": "p", "loss": 1.0, "train_top1": 0.5, "eval_top1": 0.4}],
                                 tmp_path / "h.png")):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(original)
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    with pytest.raises(ValueError, match=r"confusion must be a \[C, C\] matrix \(or an EvalResult\), got shape \(2, 3\)"):
        confusion_png(np.zeros((2, 3)), tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"classes has 2 names for a 3x3 confusion matrix"):
        confusion_png(r, tmp_path / "c.png", classes=["a", "b"])


def test_bad_arguments_name_the_value():
    """(Labels outside the model's outputs were numpy's IndexError from the confusion matrix, a float batch_size
    a TypeError, a num_classes below the outputs an IndexError, a list of numbers an AttributeError.)"""
    import pytest

    logits = torch.eye(6)
    x = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([0, 2, 0, 3])
    for data, kw, msg in [((x, torch.tensor([0, 2, 0, 6])), {}, r"labels must be in \[0, 6\) .* got values in \[0, 6\]"),
                          ((x, torch.tensor([0, -1, 0, 3])), {}, r"got values in \[-1, 3\]"),
                          ((x, y.float()), {}, "labels must be integer class indices, got dtype torch.float32"),
                          ((x, y), dict(batch_size=2.5), "batch_size must be an int >= 1, got batch_size=2.5"),
                          ((x, y), dict(num_classes=3), "num_classes=3 is below the model's 6 outputs"),
                          ((x, y), dict(num_classes=0), "num_classes must be an int >= 1 or None, got num_classes=0"),
                          ((x, y), dict(device="tpu"), "device must be a torch device .* got device='tpu'"),
                          ((x, y), dict(device=3.5), "device must be a torch device .* got device=3.5"),
                          ([1, 2, 3], {}, r"data must be a DataLoader, a Dataset or an \(images, labels\) pair")]:
        with pytest.raises(ValueError, match=msg):
            evaluate(_Fixed(logits), data, **kw)


def test_evaluate_keeps_training_mode_and_agrees_with_fast_path():
    m = CifarResNet(20).train()
    ds = synthetic_images(33)
    r = evaluate(m, ds, batch_size=8)
    assert m.training
    assert r.top1 == top1_accuracy(m, ds.images, ds.labels, batch_size=10)


def test_resnet20_checkpoint_accuracy_on_cifar_subset(shared_data):
    lm = load_model("resnet20", shared_data / "checkpoints" / "resnet20-12fca82f.th")
    ds = cifar10_dataset(shared_data, "test")
    r = evaluate(lm.model, ds)
    assert (r.correct, r.total) == (776, 846)  # 91.73%, as published for this checkpoint


class _Items(torch.utils.data.Dataset):
    """Eight items of one shape of batch or another."""

    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x, y = torch.full((1, 2, 2), float(i)), i % 6
        return {"dict": {"image": x, "label": y}, "triple": (x, y, 0), "bare": x,
                "uint8": (x.to(torch.uint8), y), "pair": (x, y)}[self.kind]


def test_batches_of_another_structure_are_named():
    """A loader of dicts was unpacked into its keys ('str' object has no attribute 'to'), a triple or bare
    images gave 'too many values to unpack', uint8 pixels failed in the model's first conv; the
    adversarial evaluation reads batches the same way."""
    import pytest

    from kcengine.evaluate import adversarial_accuracy

    model = _Fixed(torch.eye(8))
    cases = [("dict", r"each batch of data must be an \(images, labels\) pair, got a dict with keys \['image', "
                      r"'label'\]"),
             ("triple", r"got a list of 3: \(Tensor, Tensor, Tensor\)"), ("bare", r"pair, got Tensor"),
             ("uint8", r"images must be a floating-point tensor, .* got dtype torch.uint8")]
    for kind, msg in cases:
        for data in (_Items(kind), torch.utils.data.DataLoader(_Items(kind), batch_size=4)):
            with pytest.raises(ValueError, match=msg):
                evaluate(model, data)
            with pytest.raises(ValueError, match=msg):
                adversarial_accuracy(model, data, mean=(0.5,), std=(0.5,), steps=1)
    x = torch.arange(4).float().view(4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"labels must be a tensor of class indices, got list"):
        evaluate(model, (x, [0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"images and labels differ in length: shapes \(4, 1, 1, 1\) vs \(3,\)"):
        evaluate(model, (x, torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match=r"images must be a floating-point tensor"):
        evaluate(model, (x.to(torch.uint8), torch.tensor([0, 1, 2, 3])))
    r = evaluate(model, _Items("pair"))  # the well-formed loader still works
    assert r.total == 8


def test_class_names_cover_the_matrix_and_a_large_matrix_draws_at_a_bounded_size(tmp_path):
    """A model of more outputs than the data names classes (an ImageNet model on a folder of two classes):
    the result names every row, the data's names first (confusion_png then refused the result: '2 names for
    a 1000x1000 matrix').  Names the data gives beyond the outputs get rows too.  A 1000-class matrix is
    drawn as one bounded heat map (it was a 60,000-pixel square, about 14 GB of pixels)."""
    from torch.utils.data import TensorDataset

    from matplotlib import image as mpimg

    logits = torch.zeros(4, 1000)
    logits[0, 0] = logits[1, 7] = logits[2, 1] = logits[3, 1] = 1.0
    ds = TensorDataset(torch.arange(4).float().view(4, 1, 1, 1), torch.tensor([0, 0, 1, 1]))
    ds.classes = ["cat", "dog"]
    r = evaluate(_Fixed(logits), ds)
    assert r.confusion.shape == (1000, 1000) and len(r.classes) == 1000
    assert r.classes[:3] == ("cat", "dog", "2") and r.classes[-1] == "999"
    assert r.confusion[0, 0] == 1 and r.confusion[0, 7] == 1 and r.confusion[1, 1] == 2 and r.correct == 3
    assert list(r.as_dict()["per_class"])[:2] == ["cat", "dog"]
    assert r.as_dict()["per_class"]["cat"] == 0.5 and len(r.as_dict()["per_class"]) == 1000
    png = confusion_png(r, tmp_path / "big.png", title="1000 classes")
    h, w = mpimg.imread(png).shape[:2]
    assert h <= 1000 and w <= 1100

    ds.classes = ["a", "b", "c", "d"]  # more names than the model's 3 outputs: rows for them all
    r = evaluate(_Fixed(torch.eye(3)[[0, 1, 2, 2]]), ds)
    assert r.confusion.shape == (4, 4) and r.classes == ("a", "b", "c", "d")
    assert r.confusion[0, 0] == r.confusion[0, 1] == 1 and r.confusion[1, 2] == 2 and r.confusion[2:].sum() == 0
