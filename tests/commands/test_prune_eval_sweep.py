import json
import re

import pytest
import torch

from kcengine import compress
from kcengine.cli import main
from kcengine.commands import eval as eval_cmd, prune as prune_cmd, sweep as sweep_cmd
from kcengine.conv import ClusteredConv2d
from kcengine.models import load_model


@pytest.fixture()
def cifar(tmp_path):
    import pickle

    import numpy as np

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), "labels": list(range(10)) + [0, 1]}, f)
    return d


def test_eval_writes_json_and_png(ckpt, cifar, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--weights", str(ckpt), "--data", str(cifar), "--out", str(out), "--no-progress"]) == 0
    d = json.loads((out / "eval.json").read_text())
    assert d["total"] == 12 and 0 <= d["top1"] <= 1
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in out.iterdir()} == set(eval_cmd.OUT_FILES)  # the names cli.main checks before any work
    printed = capsys.readouterr().out
    assert "top-1" in printed and "clustered:" not in printed and d["conv_weight_counts"]["clustered"] == 0


def test_a_reader_that_leaves_the_pipe_early_does_not_cost_the_files(ckpt, cifar, tmp_path):
    """``kcengine eval | head -1``: the first print after head had gone raised BrokenPipeError, a traceback and
    exit 1, before eval.json was written."""
    import subprocess
    import sys

    out = tmp_path / "ev"
    p = subprocess.Popen([sys.executable, "-m", "kcengine", "eval", "--weights", str(ckpt), "--data", str(cifar),
                          "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with p:
        p.stdout.close()  # the reader is gone before the command prints anything
        err = p.stderr.read().decode()
        rc = p.wait(timeout=300)
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert json.loads((out / "eval.json").read_text())["total"] == 12


def test_eval_attack_reports_the_library_figure(ckpt, cifar, tmp_path, capsys):
    from kcengine.data import cifar10_dataset
    from kcengine.evaluate import adversarial_accuracy

    out = tmp_path / "ev"
    assert main(["eval", "--weights", str(ckpt), "--data", str(cifar), "--attack", "pgd", "--eps", "8/255",
                 "--attack-steps", "3", "--out", str(out), "--no-progress"]) == 0
    got = json.loads((out / "eval.json").read_text())["adversarial"]
    lm = load_model("resnet20", ckpt)
    want = adversarial_accuracy(lm.model, cifar10_dataset(cifar, "test", None), mean=lm.mean, std=lm.std,
                                eps=8 / 255, attack="pgd", steps=3, batch_size=500)
    assert (got["correct_robust"], got["correct_clean"], got["total"]) == \
        (want.correct_robust, want.correct_clean, want.total) == (got["correct_robust"], got["correct_clean"], 12)
    assert "under PGD-3, eps 8/255: top-1" in capsys.readouterr().out
    for argv, msg in ((["--attack", "fgsm", "--eps", "2/0"], "a number or N/255"),
                      (["--attack", "fgsm", "--eps", "1.5"], "must be in [0, 1]"),
                      (["--eps", "8/255"], "add --attack fgsm or --attack pgd"),
                      (["--attack", "fgsm", "--attack-steps", "3"], "--attack-steps is PGD's"),
                      (["--attack", "pgd", "--attack-steps", "0"], "--attack-steps must be >= 1, got 0")):
        assert main(["eval", "--weights", str(ckpt), "--data", str(cifar), *argv]) == 2
        assert msg in capsys.readouterr().err


def test_prune_writes_report(ckpt, cifar, tmp_path):
    out = tmp_path / "pr"
    assert main(["prune", "--weights", str(ckpt), "--data", str(cifar), "--plan", "map:layer3\\..*=0.5",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["layers"]) == 6 and all(lr["k"] == 32 for lr in rep["layers"])
    sd = torch.load(out / "model.pt", weights_only=True)["state_dict"]  # a save_compressed file
    assert "layer3.0.conv1.codebook" in sd


def test_prune_output_reads_back_as_weights(ckpt, cifar, tmp_path, capsys):
    # what prune writes is what eval --weights and load_model take: the clustered model, bit for bit
    out = tmp_path / "pr"
    assert main(["prune", "--weights", str(ckpt), "--no-eval", "--ratio", "0.5", "--seed", "3",
                 "--out", str(out)]) == 0
    cap = capsys.readouterr()  # the step that can take long is announced on stderr, the report is on stdout
    assert cap.err.startswith("kcengine prune: clustering 19 layer(s) at filter granularity") and "| layer |" in cap.out
    dense = load_model("resnet20", ckpt).model
    want, _ = compress(dense, ratio=0.5, seed=3)
    got = load_model("resnet20", out / "model.pt").model
    assert sum(isinstance(m, ClusteredConv2d) for m in got.modules()) == 19 and not got.training
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(x), want.eval()(x))
    with torch.no_grad():  # the --out folder itself names its model.pt (was "weights file ... does not exist")
        assert torch.equal(load_model("resnet20", out).model(x), want(x))
    capsys.readouterr()
    assert main(["eval", "--weights", str(out / "model.pt"), "--data", str(cifar), "--no-progress"]) == 0
    by_file = capsys.readouterr().out
    assert "top-1" in by_file
    # ... and says the model is clustered (it printed the figures as for the dense model): k = C_out / 2 filters
    convs = [m for m in dense.modules() if isinstance(m, torch.nn.Conv2d)]
    applied = sum(m.weight.numel() for m in convs)
    stored = sum(m.weight.shape[0] // 2 * m.weight[0].numel() for m in convs)
    assert f"clustered: 19 of 19 conv layers; conv weights {applied:,} applied, {stored:,} stored " \
           f"({applied / stored:.2f}x)" in by_file, by_file
    assert main(["eval", "--weights", str(out), "--data", str(cifar), "--no-progress"]) == 0
    by_folder = capsys.readouterr().out
    figures = re.compile(r"top-1 [\d.]+% \(\d+/\d+\), top-5 [\d.]+%")
    assert figures.search(by_folder).group() == figures.search(by_file).group()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--weights", str(empty), "--data", str(cifar), "--no-progress"]) == 2
    assert "is a folder without a model.pt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not fit"):  # a compressed resnet20 is not a resnet32
        load_model("resnet32", out / "model.pt")
    capsys.readouterr()
    # ... and says so in one line (it printed load_state_dict's page, cut mid-key)
    assert main(["eval", "--model", "resnet32", "--weights", str(out / "model.pt"), "--data", str(cifar),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(r"does not fit CifarResNet: \d+ missing \(e\.g\. \['layer1\.3\.", err), err
    for cmd in (["prune", "--ratio", "0.5", "--no-eval"], ["sweep"]):  # not clustered again: one line saying why
        assert main([*cmd, "--weights", str(out / "model.pt"), "--data", str(cifar),
                     "--out", str(tmp_path / cmd[0])]) == 2
        err = capsys.readouterr().err
        assert "already clustered (19 clustered conv layers" in err and len(err.strip().splitlines()) == 1, err


def test_prune_points_to_finetune_when_clustering_costs_accuracy(ckpt, cifar, capsys, monkeypatch, tmp_path):
    import importlib

    kc = importlib.import_module("kcengine.compress")  # the package (kcengine.compress is also the function)
    real = kc.compress

    def fixed_figures(*a, **k):  # 12 random test images decide nothing: the report says 90% -> 10%
        model, report = real(*a, **k)
        report.accuracy_before, report.accuracy_after = 0.9, 0.1
        return model, report
    monkeypatch.setattr(kc, "compress", fixed_figures)
    # the commands run as given: the same model, weights and data (finetune's default would be resnet20's public
    # weights, not these)
    same = f"--data {cifar} --weights {ckpt}"
    for argv, want in ((["--ratio", "0.5"], f"`python -m kcengine finetune {same} --ratio 0.5`"),
                       (["--plan", "map:layer3\\..*=0.5", "--granularity", "kernel"],
                        f"`python -m kcengine finetune {same} --plan 'map:layer3\\..*=0.5' --granularity kernel`"),
                       # finetune has no --layers: it was told to cluster every conv (and --seed, --cosine dropped)
                       (["--layers", "layer3.0.conv1,layer3.1.conv2", "--ratio", "0.25", "--seed", "3", "--cosine"],
                        f"`python -m kcengine finetune {same} --plan map:layer3.0.conv1=16,layer3.1.conv2=16 "
                        f"--kmeans-seed 3` (without --cosine, which finetune does not take) clusters again")):
        assert main(["prune", "--weights", str(ckpt), "--data", str(cifar), *argv]) == 0
        err = capsys.readouterr().err
        assert "accuracy 90.00% -> 10.00% is right after clustering, without retraining" in err and want in err, err
        assert "--teacher" not in err  # no --out: nothing written to train
    out = tmp_path / "p"
    assert main(["prune", "--weights", str(ckpt), "--data", str(cifar), "--ratio", "0.5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"`python -m kcengine finetune --data {cifar} --weights {out / 'model.pt'} --teacher {ckpt}` trains " \
           f"the model written to --out" in err, err
    assert main(["prune", "--weights", str(ckpt), "--data", str(cifar), "--ratio", "0.5", "--granularity",
                 "element"]) == 0
    assert "finetune" not in capsys.readouterr().err  # finetune does not train element granularity
    monkeypatch.setattr(kc, "compress", real)
    assert main(["prune", "--weights", str(ckpt), "--no-eval", "--ratio", "0.5"]) == 0
    assert "finetune" not in capsys.readouterr().err  # no figures, no hint


def test_prune_plan_takes_a_bare_ratio(ckpt, tmp_path):
    out = tmp_path / "pr"
    assert main(["prune", "--weights", str(ckpt), "--no-eval", "--plan", "0.5", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["plan"] == "fixed ratio 0.5"
    assert {p.name for p in out.iterdir()} == set(prune_cmd.OUT_FILES)
    assert [lr["k"] for lr in rep["layers"]] == [lr["n_points"] // 2 for lr in rep["layers"]]


@pytest.mark.parametrize("layers, names", [
    ("layer3\\.[0-9]{1,2}\\.conv1", ["layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"]),  # a regex with a comma
    ("conv1,layer1.0.conv2", ["conv1", "layer1.0.conv2"]),  # names
])
def test_prune_layers_takes_names_or_a_regex_holding_commas(ckpt, tmp_path, layers, names):
    out = tmp_path / "pr"
    assert main(["prune", "--weights", str(ckpt), "--no-eval", "--ratio", "0.5", "--layers", layers,
                 "--out", str(out)]) == 0
    assert [lr["name"] for lr in json.loads((out / "report.json").read_text())["layers"]] == names


def test_sweep_writes_csv(ckpt, cifar, tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", "--weights", str(ckpt), "--data", str(cifar), "--layers", "conv1", "--ratios", "0.5,1",
                 "--out", str(out)]) == 0
    lines = (out / "sweep.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("layer,")
    assert {p.name for p in out.iterdir()} == set(sweep_cmd.OUT_FILES)


@pytest.mark.parametrize("argv,msg", [
    (["prune", "--weights", "none", "--no-eval"], "give --ratio R or --plan PLAN"),
    (["prune", "--weights", "none", "--no-eval", "--ratio", "0.5", "--plan", "elbow"],
     "give --ratio R or --plan PLAN, not both (got --ratio 0.5 and --plan elbow)"),
    (["prune", "--weights", "none", "--no-eval", "--plan", "ratio=7"], "ratio must be a ratio in (0, 1]"),
    (["prune", "--weights", "none", "--no-eval", "--plan", "sensitivity=0.5"],
     "kcengine finetune --plan sensitivity=0.5 measures it"),
    (["eval", "--weights", "none"], "accuracy work needs them"),
    (["eval", "--model", "resnet19", "--weights", "none"], "--model 'resnet19' is not a known model"),
    (["eval", "--weights", "/"], "--weights '/' is a folder without a model.pt"),
    (["sweep", "--weights", "none", "--ratios", "0,2"], "--ratios must be"),
    (["prune", "--weights", "none", "--no-eval", "--plan", "elbow=0.1:inf:0.1"], "needs finite START, STOP and STEP"),
    (["prune", "--weights", "none", "--no-eval", "--ratio", "0.5", "--backend", "gpu"],
     "--backend must be auto or one of cpu, torch, cuda, triton, got 'gpu'"),
    (["sweep", "--weights", "none", "--backend", "gpu"], "--backend must be auto or one of"),
    # compress's words for a Python caller, spelled as flags (it said "pass {'layers': {'re:.*': 1}}")
    (["prune", "--weights", "none", "--no-eval", "--plan", "1"],
     "--plan 1: a bare number is a ratio in (0, 1] (e.g. --plan 0.5); for the same k in every layer pass "
     "--plan map:re:.*=1"),
    (["prune", "--weights", "none", "--no-eval", "--ratio", "0.5", "--layers", "zzz"],
     "--layers 'zzz' matches no conv layer"),
])
def test_user_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.mark.parametrize("extra, msg", [(["--layers", "nonsense"], "--layers 'nonsense' matches no conv layer"),
                                        (["--seed", "-1"], "--seed must be an int in [0, ")])
def test_sweep_errors_name_flags(ckpt, cifar, capsys, extra, msg):
    assert main(["sweep", "--weights", str(ckpt), "--data", str(cifar), "--ratios", "0.5", *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [["prune", "--no-eval", "--ratio", "0.5"], ["sweep"]])
def test_a_backend_that_cannot_run_here_is_a_user_error(command, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend may run")
    assert main([command[0], "--weights", "none", *command[1:], "--backend", "cuda"]) == 2  # was a traceback
    err = capsys.readouterr().err
    assert "--backend cuda: no CUDA device" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [["prune", "--no-eval", "--ratio", "0.5"], ["sweep"]])
def test_a_bad_backend_override_in_the_environment_is_a_user_error_before_any_work(command, capsys, monkeypatch):
    """KCENGINE_BACKEND=gpu was found only at the first k-means call, after the model and data were loaded."""
    monkeypatch.setenv("KCENGINE_BACKEND", "gpu")
    assert main([command[0], "--weights", "none", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "KCENGINE_BACKEND=gpu (environment) is not one of auto, cpu" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [["eval", "--weights", "none"], ["prune", "--weights", "none", "--no-eval",
                                     "--ratio", "0.5"], ["sweep", "--weights", "none"], ["bench", "--quick"]])
def test_out_that_cannot_be_a_folder_is_a_user_error_before_any_work(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main([*command, "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"--out {afile}: exists and is not a folder" in err and err.count("\n") == 1
    assert afile.read_text() == "keep me"
    assert main([*command, "--out", str(afile / "sub")]) == 2  # under a file: cannot be created
    err = capsys.readouterr().err
    assert f"--out {afile / 'sub'}: cannot create the folder" in err and err.count("\n") == 1
    nested = tmp_path / "n1" / "n2"  # created for the command, removed again when it fails
    assert main([*command, "--out", str(nested), "--model", "resnet19"]) == 2
    assert not (tmp_path / "n1").exists()


def test_missing_pretrained_weights_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("KCENGINE_DATA", str(tmp_path / "no-shared-data"))  # no ../shared copy to fall back on
    assert main(["eval", "--no-download"]) == 2
    assert "not in the torch hub cache" in capsys.readouterr().err


def test_pretrained_falls_back_on_the_shared_copy_of_the_public_file(ckpt, cifar, tmp_path, monkeypatch, capsys):
    # the default --weights pretrained, offline: the published file in <shared data>/checkpoints is taken when
    # its sha256 starts with the hash its name carries (as the hub checks), under any spelling of the name
    import shutil

    from kcengine.bench.common import shared_data_dir

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    shared = tmp_path / "shared-data"
    (shared / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, shared / "checkpoints" / "resnet20-12fca82f.th")  # a stand-in: not the published bytes
    monkeypatch.setenv("KCENGINE_DATA", str(shared))
    assert main(["eval", "--no-download", "--data", str(cifar)]) == 2
    err = capsys.readouterr().err
    assert "not in the torch hub cache" in err and "is not the published file" in err
    monkeypatch.delenv("KCENGINE_DATA")
    real = shared_data_dir()
    if real is None or not (real / "checkpoints" / "resnet20-12fca82f.th").is_file():
        pytest.skip("../shared/data/checkpoints/resnet20-12fca82f.th is absent: the real file's case")
    for name in ("resnet20", "cifar_resnet20"):
        assert main(["eval", "--model", name, "--no-download", "--data", str(cifar), "--no-progress"]) == 0
        assert f"({real / 'checkpoints' / 'resnet20-12fca82f.th'}): top-1" in capsys.readouterr().out


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/kcengine", "kcengine"),
                                         ("/x/kcengine/__main__.py", "python -m kcengine")])
def test_errors_name_the_command_as_it_was_called(argv0, prog, monkeypatch, capsys):
    """The command's own errors and argparse's start alike, with the program as the user typed it (they said
    "kcengine bench:" and "python -m kcengine bench:" side by side, whichever way it was called)."""
    monkeypatch.setattr("sys.argv", [argv0])
    assert main(["bench", "--ratio", "2"]) == 2
    assert capsys.readouterr().err.strip() == f"{prog} bench: error: --ratio must be in (0, 1], got 2.0"
    with pytest.raises(SystemExit):
        main(["bench", "--device", "tpu"])
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"{prog} bench: error: argument --device")


def test_eval_of_an_imagenet_model_on_an_image_folder(imagenet_folder, tmp_path, capsys):
    """The ImageNet branch of ``kcengine eval``: a torchvision model from a state-dict file, scored on an
    ImageFolder tree, against the same model run on the fixture's reference inputs."""
    root, weights = imagenet_folder.root, imagenet_folder.weights
    with torch.no_grad():
        pred = imagenet_folder.model(imagenet_folder.x).argmax(1).tolist()
    labels = imagenet_folder.labels.tolist()
    confusion = [[sum(1 for p, t in zip(pred, labels) if t == r and p == c) for c in range(2)] for r in range(2)]

    out = tmp_path / "ev"
    assert main(["eval", "--model", "resnet18", "--weights", str(weights), "--data", str(root), "--out", str(out),
                 "--batch-size", "4", "--no-progress"]) == 0
    d = json.loads((out / "eval.json").read_text())
    assert d["total"] == 6 and d["correct"] == sum(p == t for p, t in zip(pred, labels))
    assert [row[:2] for row in d["confusion"][:2]] == confusion
    assert list(d["per_class"])[:2] == ["cat", "dog"]
    printed = capsys.readouterr().out
    assert "resnet18" in printed and re.search(r"^ +cat: \d", printed, re.M) and re.search(r"^ +dog: ", printed, re.M)
    assert "n/a" not in printed  # the 998 classes without images are not listed
    # --limit 2 of the folder's 6 images (3 cats, then 3 dogs): evenly spaced, one of each class (0 and 3)
    assert main(["eval", "--model", "resnet18", "--weights", str(weights), "--data", str(root), "--limit", "2",
                 "--out", str(tmp_path / "ev2"), "--no-progress"]) == 0
    d2 = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert d2["total"] == 2 and d2["correct"] == (pred[0] == labels[0]) + (pred[3] == labels[3])
    assert [sum(row) for row in d2["confusion"][:2]] == [1, 1]
    capsys.readouterr()
    assert main(["eval", "--model", "resnet18", "--weights", str(weights), "--data", str(tmp_path / "nope"),
                 "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # session 55: two of ImageNet's class folders (say goldfish, n01443537 = class 1, and tiger shark,
    # n01491361 = class 3) were scored as classes 0 and 1: a perfect model read 0%.  Refused; the cat/dog
    # folders above are the user's own labels (the i-th folder in sorted order) and pass.
    import shutil

    wn = tmp_path / "wnids"
    for name, wnid in (("cat", "n01443537"), ("dog", "n01491361")):
        shutil.copytree(root / name, wn / wnid)
    assert main(["eval", "--model", "resnet18", "--weights", str(weights), "--data", str(wn), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 ImageNet class folders (n01443537, n01491361) but resnet18 has 1000 outputs" in err


def test_eval_lists_at_most_twenty_classes(capsys):
    from types import SimpleNamespace

    import numpy as np

    from kcengine.commands.eval import _print_per_class

    acc = np.linspace(0.9, 0.1, 25)
    _print_per_class(SimpleNamespace(classes=tuple(f"c{i}" for i in range(25)), per_class=acc), where="eval.json")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  per-class accuracy of 25 classes in eval.json; the lowest five:"
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["c24", "c23", "c22", "c21", "c20"]
    _print_per_class(SimpleNamespace(classes=("a", "b", "c"), per_class=np.array([1.0, np.nan, 0.5])))
    assert capsys.readouterr().out.splitlines() == ["             a: 100.0%", "             b: n/a",
                                                    "             c: 50.0%"]


def test_prune_and_sweep_of_an_imagenet_model_on_an_image_folder(imagenet_folder, tmp_path):
    """prune and sweep take the same folder: prune's accuracies are those of the model and of compress's
    model on the reference inputs; sweep's rows those of one layer clustered alone."""
    import csv

    import kcengine
    from kcengine.evaluate import top1_accuracy

    m, x, y = imagenet_folder.model, imagenet_folder.x, imagenet_folder.labels
    common = ["--model", "resnet18", "--weights", str(imagenet_folder.weights), "--data", str(imagenet_folder.root)]
    out = tmp_path / "pruned"
    assert main(["prune", *common, "--ratio", "0.25", "--layers", "layer4.*", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    small, _ = kcengine.compress(m, ratio=0.25, layers="layer4.*")
    assert rep["accuracy_before"] == pytest.approx(top1_accuracy(m, x, y))
    assert rep["accuracy_after"] == pytest.approx(top1_accuracy(small, x, y))
    out = tmp_path / "sweep"
    assert main(["sweep", *common, "--layers", "layer4.1.conv2", "--ratios", "0.25", "--out", str(out)]) == 0
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    alone, _ = kcengine.compress(m, ratio=0.25, layers=["layer4.1.conv2"])
    assert [(r["layer"], r["k"]) for r in rows] == [("layer4.1.conv2", "128")]
    assert float(rows[0]["accuracy"]) == pytest.approx(top1_accuracy(alone, x, y))
    assert rep["accuracy_before"] != rep["accuracy_after"]  # the folder's scores are not all one class


def test_version_is_the_installed_distributions(capsys):
    """``--version`` prints the package's version, which is the one its installed metadata (pyproject) gives."""
    from importlib.metadata import version

    import kcengine

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kcengine {kcengine.__version__}"
    assert kcengine.__version__ == version("kcengine")
