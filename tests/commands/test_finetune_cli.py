"""``kcengine finetune``: outputs, resume through the CLI, one-line user errors."""
import json
import pickle

import numpy as np
import pytest
import torch

import kcengine

from kcengine.cli import main


@pytest.fixture()
def cifar(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [("test_batch", 12)] + [(f"data_batch_{i}", 8) for i in range(1, 6)]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    return d


def _args(ckpt, cifar, *extra):
    return ["finetune", "--model", "resnet20", "--weights", str(ckpt), "--data", str(cifar), "--ratio", "0.5",
            "--train-batch-size", "8", "--limit", "16", "--no-progress", *extra]


def test_finetune_writes_model_history_and_curves(ckpt, cifar, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(_args(ckpt, cifar, "--epochs", "2", "--no-refit", "--out", str(out))) == 0
    h = json.loads((out / "history.json").read_text())
    assert h["mode"] == "centroids" and len(h["history"]) == 2
    assert all(0 <= r["eval_top1"] <= 1 for r in h["history"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]  # a save_compressed file
    assert "layer1.0.conv1.codebook" in state and "layer1.0.conv1.index" in state
    back = kcengine.load_compressed(out / "model.pt")  # no skeleton needed: the builder is recorded
    assert isinstance(back.layer1[0].conv1, kcengine.nn.ClusteredConv2d)
    sd = back.state_dict()
    assert sd.keys() == state.keys() and all(torch.equal(sd[n], state[n]) for n in state)
    assert "after 2 epochs" in capsys.readouterr().out
    from kcengine.commands.finetune import OUT_FILES

    assert {p.name for p in out.iterdir()} == set(OUT_FILES)  # the names cli.main checks before any work


def test_finetune_progressive_order_and_resume(ckpt, cifar, tmp_path, capsys):
    ck = tmp_path / "ck"
    args = _args(ckpt, cifar, "--mode", "progressive", "--order", r"layer3\.0\..*;layer1.0.conv1,layer1.0.conv2",
                 "--epochs", "0", "--checkpoint-dir", str(ck), "--out", str(tmp_path / "p"))
    assert main(args) == 0
    h = json.loads((tmp_path / "p" / "history.json").read_text())
    assert h["stages"] == [["layer3.0.conv1", "layer3.0.conv2"], ["layer1.0.conv1", "layer1.0.conv2"]]
    capsys.readouterr()
    assert main(args) == 0  # everything done: resumes at the end, trains nothing more
    h2 = json.loads((tmp_path / "p" / "history.json").read_text())
    assert h2["history"] == h["history"]


def test_finetune_with_a_sensitivity_plan_prints_and_records_its_split(ckpt, cifar, tmp_path, capsys):
    """``--plan sensitivity=0.5``: resnet20's 344 filters of ratio 0.5, split by the sweep; the split is printed
    and in history.json, and the saved model has it."""
    out = tmp_path / "s"
    args = _args(ckpt, cifar, "--epochs", "0", "--out", str(out))
    i = args.index("--ratio")
    args[i:i + 2] = ["--plan", "sensitivity=0.5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "k per layer (output sensitivity, 344 filters): conv1=" in printed
    ks = json.loads((out / "history.json").read_text())["layer_ks"]
    assert sum(ks.values()) == 344 and len(ks) == 19 and len(set(ks.values())) > 1
    back = kcengine.load_compressed(out / "model.pt")
    assert {n: back.get_submodule(n).num_clusters for n in ks} == ks


@pytest.mark.parametrize("extra, msg", [
    ((), "give --ratio"),
    (("--ratio", "0.5", "--plan", "0.25"), "not both (got --ratio 0.5 and --plan 0.25)"),
    (("--ratio", "0.5", "--epochs", "-1"), "epochs must be"),
    (("--ratio", "0.5", "--mode", "progressive", "--order", "nothing"), "matches no layer"),
    (("--ratio", "0.5", "--mixup", "-1"), "--mixup must be a finite number >= 0.0, got -1.0"),
    (("--ratio", "0.5", "--mode", "progressive", "--order", ";;"), "--order ';;' names no stage"),
    (("--ratio", "0.5", "--stage-epochs", "2"), "--stage-epochs sets the stages of --mode 'progressive'"),
    (("--ratio", "0.5", "--order", "layer3"),
     "--order sets the stages of --mode 'progressive'; --mode 'centroids' clusters every layer at once, got "
     "['layer3']"),
    (("--ratio", "2"), "--ratio must be a ratio in (0, 1]"),
    (("--plan", "nonsense"), "--plan 'nonsense' is not understood"),
    (("--plan", "50"), "for the same k in every layer pass --plan map:re:.*=50"),  # not a Python dict
    (("--plan", "sensitivity=0.5", "--granularity", "kernel"), "it needs --granularity 'filter', got --granularity "
                                                                "'kernel'"),
    (("--ratio", "0.5", "--no-resume"), "--no-resume starts over from a --checkpoint-dir's checkpoint"),
    # finetune's checks name its keywords; the CLI names the flags typed
    (("--ratio", "0.5", "--batch-size", "0"), "--batch-size must be an int >= 1, got 0"),
    (("--ratio", "0.5", "--mode", "progressive", "--stage-epochs", "-1"), "--stage-epochs must be an int >= 0, got -1"),
    (("--ratio", "0.5", "--alpha", "2"), "--alpha must be a finite number >= 0.0 and <= 1.0, got 2.0"),
    (("--ratio", "0.5", "--seed", "-1"), "--seed must be in [0, 2**63 - 1], got -1"),
    (("--ratio", "0.5", "--kmeans-seed", "-1"), "--kmeans-seed must be in [0, 2**63 - 1], got -1"),
])
def test_finetune_user_errors(ckpt, cifar, capsys, extra, msg):
    args = ["finetune", "--model", "resnet20", "--weights", str(ckpt), "--data", str(cifar), "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_training_defaults_are_finetunes_own():
    """The CLI's recipe is kcengine.finetune's defaults, not a second copy of them."""
    import inspect

    from kcengine.cli import build_parser
    from kcengine.train import finetune
    from kcengine.train.finetune import RECOMMENDED_BATCH

    parser, _ = build_parser()
    args = parser.parse_args(["finetune", "--ratio", "0.5"])
    sig = {n: p.default for n, p in inspect.signature(finetune).parameters.items()}
    for name in ("mode", "granularity", "stage_epochs", "stage_training", "optimizer", "lr", "schedule",
                 "weight_decay", "temperature", "alpha", "feature_weight", "mixup", "seed", "epochs"):
        assert getattr(args, name) == sig[name], name
    assert args.train_batch_size == RECOMMENDED_BATCH
    assert not args.no_augment and sig["augment"]


def test_finetune_limit_and_split_arguments(ckpt, cifar, capsys):
    # --limit counts training images and must be >= 1; there is no --split (train on train, evaluate on test)
    assert main(_args(ckpt, cifar)[:-3] + ["--limit", "0", "--no-progress"]) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(ckpt, cifar, "--split", "train"))
    assert "unrecognized arguments: --split" in capsys.readouterr().err


def test_finetune_of_an_imagenet_model_on_image_folders(imagenet_folder, tmp_path, capsys):
    """A torchvision model trains on ImageNet's layout (train/ and val/ class folders): the CLI's model is the one
    kcengine.finetune makes from the same images as tensors (the fixture's reference transform), with --limit 4
    keeping 4 of the 6 training images evenly spaced (0, 1, 3, 4: both classes).  No epoch and no refit (their
    arithmetic is tested on small models; resnet18's refit alone takes 26 s here): the BN statistics come from
    the training folder's images, the accuracy from the val folder's."""
    import shutil

    from kcengine.data import TensorImages, make_loader

    data = tmp_path / "imagenet"
    shutil.copytree(imagenet_folder.root, data / "train")
    shutil.copytree(imagenet_folder.root, data / "val")
    out = tmp_path / "ft"
    common = ["finetune", "--model", "resnet18", "--weights", str(imagenet_folder.weights), "--ratio", "0.5",
              "--train-batch-size", "2", "--epochs", "0", "--no-refit", "--no-progress"]
    assert main([*common, "--data", str(data), "--limit", "4", "--out", str(out)]) == 0
    x, y = imagenet_folder.x, imagenet_folder.labels
    keep = [0, 1, 3, 4]
    ref = kcengine.finetune(imagenet_folder.model, make_loader(TensorImages(x[keep], y[keep]), 2, shuffle=True, seed=0),
                            plan={"ratio": 0.5}, epochs=0, output_calibration=False, eval_data=(x, y), progress=False,
                            compress_options={"seed": 0})
    h = json.loads((out / "history.json").read_text())
    assert h["accuracy"] == ref.accuracy and h["accuracy_start"] == ref.accuracy_start
    got = kcengine.load_compressed(out / "model.pt").state_dict()
    want = ref.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    capsys.readouterr()
    shutil.rmtree(data / "val")
    assert main([*common, "--data", str(data)]) == 2
    assert "has no val/ folder" in capsys.readouterr().err
    assert main([*common]) == 2
    assert "pass --data PATH to a folder holding train/ and val/" in capsys.readouterr().err
    # each folder numbers its own classes in sorted order: val/ without cat/ would label its dogs 0
    shutil.copytree(imagenet_folder.root / "dog", data / "val" / "dog")
    assert main([*common, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "train/ and val/ must hold the same class folders" in err and "only in train/: cat (1)" in err


def test_finetune_errors_name_flags(ckpt, cifar, tmp_path, capsys):
    """A checkpoint written with other settings is resumed with --no-resume (the flag, not resume=False)."""
    ck, out = tmp_path / "ck", tmp_path / "o"
    assert main(_args(ckpt, cifar, "--epochs", "1", "--no-refit", "--checkpoint-dir", str(ck), "--out", str(out))) == 0
    capsys.readouterr()
    assert main(_args(ckpt, cifar, "--epochs", "1", "--no-refit", "--checkpoint-dir", str(ck), "--lr", "0.5")) == 2
    err = capsys.readouterr().err
    assert "use another --checkpoint-dir or --no-resume" in err and "resume=False" not in err


def _clustered_args(ckpt, cifar, clustered, *extra):
    """_args with a clustered --weights and no --ratio."""
    args = _args(ckpt, cifar, *extra)
    args[args.index("--weights") + 1] = str(clustered)
    i = args.index("--ratio")
    del args[i:i + 2]
    return args


def test_finetune_trains_a_clustered_model_with_its_dense_teacher(ckpt, cifar, tmp_path, capsys):
    """A prune/finetune --out model.pt is trained as it is clustered.  With --teacher (the dense weights) the run
    is the recipe's for a model that arrives clustered: kcengine.finetune(clustered, loader, teacher=dense,
    output_calibration=True), refit and distillation included; the same state dict and accuracies come out."""
    from kcengine.data import Normalization, cifar10_dataset, make_loader
    from kcengine.models import load_model

    first = tmp_path / "first"
    assert main(_args(ckpt, cifar, "--epochs", "0", "--no-refit", "--out", str(first))) == 0
    clustered = first / "model.pt"
    out = tmp_path / "second"
    assert main(_clustered_args(ckpt, cifar, clustered, "--epochs", "1", "--teacher", str(ckpt),
                                "--out", str(out))) == 0
    assert "no --teacher" not in capsys.readouterr().out
    dense, model = load_model("resnet20", str(ckpt)), load_model("resnet20", str(clustered)).model
    norm = Normalization(dense.mean, dense.std)
    train = cifar10_dataset(cifar, "train", norm, limit=16)
    test = cifar10_dataset(cifar, "test", norm)
    ref = kcengine.finetune(model, make_loader(train, 8, shuffle=True, seed=0), teacher=dense.model, epochs=1,
                            output_calibration=True, eval_data=(test.images, test.labels), progress=False)
    h = json.loads((out / "history.json").read_text())
    assert h["plan"] is None and h["teacher"] == str(ckpt)
    assert h["accuracy_start"] == ref.accuracy_start and h["accuracy"] == ref.accuracy
    got, want = kcengine.load_compressed(out / "model.pt").state_dict(), ref.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    # the refit moved the codebooks (a run without it would keep the clustered ones until training)
    before = model.state_dict()
    assert not torch.equal(ref.model.state_dict()["layer1.0.conv1.codebook"], before["layer1.0.conv1.codebook"])
    # without --teacher: the labels alone, and the run says so
    assert main(_clustered_args(ckpt, cifar, clustered, "--epochs", "0", "--out", str(tmp_path / "third"))) == 0
    assert "no --teacher is given: training on the labels alone" in capsys.readouterr().out
    ref = kcengine.finetune(model, make_loader(train, 8, shuffle=True, seed=0), epochs=0,
                            eval_data=(test.images, test.labels), progress=False)
    h = json.loads((tmp_path / "third" / "history.json").read_text())
    assert h["accuracy_start"] == ref.accuracy_start and h["teacher"] is None


def test_finetune_says_when_training_ended_below_its_start(ckpt, cifar, tmp_path, capsys, monkeypatch):
    """The model kept is the last epoch's: a run that ended below its refit start (74.5% -> 44.6% seen with one
    epoch at full LR) said nothing of it.  The accuracies are the library's, shifted here to make each case."""
    import kcengine.train

    real = kcengine.train.finetune
    for shift, noted in ((-0.25, True), (0.0, False)):
        def shifted(*a, **kw):
            res = real(*a, **kw)
            res.history[-1]["eval_top1"] = res.accuracy_start + shift  # what res.accuracy reads
            return res

        monkeypatch.setattr(kcengine.train, "finetune", shifted)
        assert main(_args(ckpt, cifar, "--epochs", "1")) == 0
        err = capsys.readouterr().err
        assert ("note: training ended at" in err) == noted, err
        if noted:
            assert "below the" in err and "the model kept is the last epoch's" in err
            assert "the recipe is 20 epochs of centroids mode" in err


def test_finetune_refuses_a_plan_for_a_clustered_model_and_a_clustered_teacher(ckpt, cifar, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_args(ckpt, cifar, "--epochs", "0", "--no-refit", "--out", str(out))) == 0
    clustered = out / "model.pt"
    capsys.readouterr()
    args = _args(ckpt, cifar, "--epochs", "0")
    args[args.index("--weights") + 1] = str(clustered)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"--weights {clustered} holds a clustered model" in err and "--ratio 0.5 would cluster dense" in err
    assert len(err.splitlines()) == 1
    assert main(_clustered_args(ckpt, cifar, clustered, "--mode", "progressive")) == 2
    assert "--mode progressive clusters dense weights stage by stage" in capsys.readouterr().err
    assert main(_args(ckpt, cifar, "--epochs", "0", "--teacher", str(clustered))) == 2
    assert f"--teacher {clustered} holds a clustered model" in capsys.readouterr().err
    assert main(_args(ckpt, cifar, "--epochs", "0", "--teacher", "none")) == 2
    assert "resnet20 has no trained weights (--teacher none)" in capsys.readouterr().err
    assert main(_args(ckpt, cifar, "--epochs", "0", "--teacher", str(tmp_path / "missing.th"))) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "missing.th" in err
    # a per-element clustered file (prune --granularity element) was not seen as clustered: "give --ratio R", and
    # with --ratio the library's "already clustered"; finetune does not train such layers, and now says so first
    elem = tmp_path / "elem"
    assert main(["prune", "--weights", str(ckpt), "--no-eval", "--granularity", "element", "--plan",
                 "map:layer3.2.conv2=4", "--out", str(elem)]) == 0
    capsys.readouterr()
    for with_ratio in (False, True):
        args = _args(ckpt, cifar, "--epochs", "0")
        args[args.index("--weights") + 1] = str(elem / "model.pt")
        if not with_ratio:
            del args[args.index("--ratio"):args.index("--ratio") + 2]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "holds per-element clustered layers (prune --granularity element), which finetune does not train" \
            in err and len(err.splitlines()) == 1, err


def test_finetune_says_which_layers_a_partial_plan_left_dense(ckpt, cifar, tmp_path, capsys):
    args = _args(ckpt, cifar, "--mode", "progressive", "--order", "layer3", "--epochs", "0", "--no-refit")
    assert main(args) == 0
    assert "6 of 19 conv layers clustered; dense: conv1, layer1.0.conv1, layer1.0.conv2, layer1.1.conv1, " \
           "layer1.1.conv2, layer1.2.conv1, ... (13)" in capsys.readouterr().out
