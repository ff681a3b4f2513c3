import pickle

import numpy as np
import pytest
import torch

from kcengine.data import Normalization, cifar10_dataset, make_loader, read_cifar10, synthetic_images


def _write_batches(root, n_test=7, n_train=3):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    data = {}
    for name, n in [("test_batch", n_test)] + [(f"data_batch_{i}", n_train) for i in range(1, 6)]:
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": d, "labels": lab}, f)
        data[name] = (d, lab)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return data


def test_reader_layout_is_channel_planar(tmp_path):
    data = _write_batches(tmp_path)
    s = read_cifar10(tmp_path, "test")
    d, lab = data["test_batch"]
    assert s.images.shape == (7, 3, 32, 32) and s.images.dtype == torch.uint8
    # pixel (row 5, col 9) of image 2: R at 5*32+9, G at 1024 + ..., B at 2048 + ...
    for c in range(3):
        assert int(s.images[2, c, 5, 9]) == int(d[2, c * 1024 + 5 * 32 + 9])
    assert s.labels.tolist() == lab
    assert s.classes == tuple(f"c{i}" for i in range(10))
    tr = read_cifar10(tmp_path / "cifar-10-batches-py", "train")
    assert len(tr) == 15


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        read_cifar10(tmp_path)
    _write_batches(tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        read_cifar10(tmp_path, "val")
    for root in (None, 3):  # was TypeError from Path()
        with pytest.raises(ValueError, match="root must be a folder path"):
            read_cifar10(root)


def test_a_damaged_batch_is_named(tmp_path):
    """A truncated, empty or non-pickle batch raised pickle's own error (or "invalid literal for int()"), naming
    no file; the CLI printed a traceback."""
    _write_batches(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    whole = (folder / "test_batch").read_bytes()
    for damaged in (whole[: len(whole) // 2], b"", b"garbage\n"):
        (folder / "test_batch").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"test_batch is not a readable CIFAR python batch \("):
            read_cifar10(tmp_path, "test")
    (folder / "test_batch").write_bytes(whole)
    (folder / "batches.meta").write_bytes(b"")
    with pytest.raises(ValueError, match=r"batches.meta is not a readable CIFAR python batch \(EOFError"):
        read_cifar10(tmp_path, "test")


def test_normalization_matches_formula(tmp_path):
    _write_batches(tmp_path)
    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    ds = cifar10_dataset(tmp_path, "test", norm)
    raw = read_cifar10(tmp_path, "test").images.double() / 255
    mean = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1).double()
    std = torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1).double()
    ref = (raw - mean) / std
    torch.testing.assert_close(ds.images.double(), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="std > 0"):
        Normalization((0.0,), (0.0,))


def test_synthetic_and_loader():
    ds = synthetic_images(10, num_classes=3, seed=1)
    assert torch.equal(ds.images, synthetic_images(10, num_classes=3, seed=1).images)
    batches = list(make_loader(ds, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]



def test_helpers_take_numpy_ints_and_name_bad_values(tmp_path):
    """read_cifar10 refused limit=np.int64(5) (other entry points take numpy ints); synthetic_images(2.5) was
    a TypeError from torch."""
    _write_batches(tmp_path)
    assert read_cifar10(tmp_path, limit=np.int64(5)).images.shape[0] == 5
    assert synthetic_images(np.int64(3)).images.shape[0] == 3
    for call, msg in [(lambda: read_cifar10(tmp_path, limit=0), r"limit must be an int >= 1 or None, got limit=0"),
                      (lambda: synthetic_images(2.5), r"n must be an int >= 1, got n=2.5"),
                      (lambda: synthetic_images(4, num_classes=0), r"num_classes must be an int >= 1"),
                      (lambda: make_loader(synthetic_images(4), 0), r"batch_size must be an int >= 1, got batch_size=0"),
                      (lambda: make_loader(synthetic_images(4), 2, seed=-1), r"seed must be an int in \[0, ")]:
        with pytest.raises(ValueError, match=msg):
            call()


def test_shared_cifar_subset(shared_data):
    s = read_cifar10(shared_data, "test")
    assert len(s) == 846
    assert np.bincount(s.labels.numpy(), minlength=10).tolist() == [83, 70, 88, 84, 76, 79, 97, 87, 88, 94]
    assert len(read_cifar10(shared_data, "train")) == 4660
