import sys

import numpy as np
import torch
from torch import nn

import kcengine
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

    # session 55: digit names that are not their rows' indices ("3" naming row 0) made the index names of the
    # rows past them collide, and as_dict (eval.json) lost a row
    ds.classes = ["3", "1"]
    r = evaluate(_Fixed(torch.eye(5)[[0, 1, 2, 2]]), ds)
    assert r.classes == ("3", "1", "2", "output 3", "4") and len(r.as_dict()["per_class"]) == 5


def test_a_tensordataset_subclass_is_read_through_its_items():
    """A Dataset holding .tensors was sliced directly, skipping a subclass's own __getitem__ (here a
    normalization): evaluate scored the raw tensors, 0% where a DataLoader of the same dataset gave 100%."""
    from torch.utils.data import DataLoader, TensorDataset

    class Shifted(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x + 1.0, y  # the model reads the first pixel: raw 0..3 becomes 1..4

    logits = torch.eye(6)
    x = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([1, 2, 3, 4])
    ds = Shifted(x, y)
    assert evaluate(_Fixed(logits), ds).top1 == 1.0
    assert evaluate(_Fixed(logits), DataLoader(ds, batch_size=3)).top1 == 1.0
    assert evaluate(_Fixed(logits), TensorDataset(x, y)).top1 == 0.0  # the plain one: its tensors as they are


def test_every_submodule_keeps_its_own_mode():
    """model.train(was_training) after the pass set every submodule to the top one's mode: a BatchNorm frozen
    in a training model came back training, a dropout left on in an eval model came back off."""
    net = CifarResNet(8)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    net.train()
    net.bn1.eval()  # frozen statistics
    for fn in (lambda: evaluate(net, (x, y)), lambda: top1_accuracy(net, x, y)):
        fn()
        assert net.training and not net.bn1.training and net.layer1[0].bn1.training
    net.eval()
    drop = nn.Dropout().train()
    model = nn.Sequential(net, drop)
    model.training = False
    evaluate(model, (x, y))
    assert drop.training and not net.training


def test_model_output_and_argument_checks_name_what_is_wrong(tmp_path):
    import pytest

    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="model must be an nn.Module, got NoneType"):
        evaluate(None, (x, y))
    with pytest.raises(ValueError, match=r"the model's output must be an \[N, classes\] tensor of logits \(N = 4\), "
                                         r"got tuple"):
        evaluate(nn.Sequential(net, _Tuple()), (x, y))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        evaluate(nn.Sequential(net, _Max()), (x, y))
    with pytest.raises(ValueError, match="images are torch.float64 but the model's parameters are torch.float32"):
        evaluate(net, (x.double(), y))
    # [N, H, W] images: torch's channel mismatch counted the images as channels; a clustered layer's own check
    # spoke of its codebook
    small, _ = kcengine.compress(net, ratio=0.5)
    for model in (net, small):
        with pytest.raises(ValueError, match=r"images must be batches \[N, C, H, W\], got shape \(4, 8, 8\).*"
                                             r"images.unsqueeze\(1\)"):
            evaluate(model, (x[:, 0], y))
    with pytest.raises(ValueError, match=r"classes must be a sequence of class names .* got classes=5"):
        evaluate(net, (x, y), classes=5)
    with pytest.raises(ValueError, match="classes must be a sequence of class names"):
        evaluate(net, (x, y), classes="abcde")
    assert evaluate(net, (x, y), classes=np.array(list("abcde"))).classes == tuple("abcde")  # names as an array
    # top1_accuracy, public, checked nothing: [N, 1] labels broadcast to 400%, an empty set divided by zero
    with pytest.raises(ValueError, match=r"labels must be \[N\] with one label per image"):
        top1_accuracy(net, x, y[:, None])
    with pytest.raises(ValueError, match="holds no images"):
        top1_accuracy(net, x[:0], y[:0])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got batch_size=0"):
        top1_accuracy(net, x, y, batch_size=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        top1_accuracy(net, x, y + 96)
    assert top1_accuracy(net, x, y) == evaluate(net, (x, y)).top1
    # the PNG's path: ".png" added to a bare name (matplotlib wrote conf.png and "conf" came back); a folder refused
    r = evaluate(net, (x, y))
    assert confusion_png(r, tmp_path / "conf") == tmp_path / "conf.png" and (tmp_path / "conf.png").is_file()
    with pytest.raises(ValueError, match="is a folder; give the PNG file's path"):
        confusion_png(r, tmp_path)


class _Tuple(nn.Module):
    def forward(self, z):
        return z, z


class _Max(nn.Module):
    def forward(self, z):
        return z.amax(1)


def test_tied_logits_predict_the_first_class_as_argmax_does():
    """evaluate took top-1 from topk, whose order among ties is its own: a model of constant logits 'predicted'
    class 8 where top1_accuracy (argmax) predicted class 0, and the two reported different accuracies."""
    x = torch.zeros(40, 1, 2, 2)
    y = torch.arange(40) % 10
    model = _Fixed(torch.zeros(1, 10))
    r = evaluate(model, (x, y), batch_size=16)
    assert r.top1 == top1_accuracy(model, x, y) == 0.1  # class 0 is 4 of the 40 labels
    assert (r.confusion[:, 0] == 4).all() and r.confusion.sum() == 40


def test_a_numpy_array_of_class_names_on_the_dataset_is_read():
    """``dataset.classes`` as a numpy array: evaluate asked for its truth value ("ambiguous")."""
    ds = torch.utils.data.TensorDataset(torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous(),
                                        torch.tensor([0, 1, 2, 3]))
    ds.classes = np.array(["a", "b", "c", "d"])
    logits = torch.eye(4)
    r = evaluate(_Fixed(logits), ds)
    assert r.classes == ("a", "b", "c", "d") and r.top1 == 1.0
    r = evaluate(_Fixed(logits), torch.utils.data.DataLoader(ds, batch_size=2))
    assert r.classes == ("a", "b", "c", "d")
