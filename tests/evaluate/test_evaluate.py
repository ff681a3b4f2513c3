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
