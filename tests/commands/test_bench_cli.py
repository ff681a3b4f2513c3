"""`python -m kcengine bench` and `env` in a subprocess: output folder, JSON schema, user errors."""
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, timeout=600, **env_extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **env_extra)
    return subprocess.run([sys.executable, "-m", "kcengine", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_bench_quick_writes_report_folder(tmp_path):
    out = tmp_path / "report"
    r = run_cli("bench", "--model", "resnet20", "--quick", "--sections", "clustering,inference",
                "--max-problems", "2", "--weights", "none", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["model"] == "resnet20" and set(res["sections"]) == {"clustering", "inference"}
    assert any("time of the clustering section" in r["what"] for r in res["summary"])
    assert any(r["what"].startswith("inference batch 1") for r in res["summary"])
    for key in ("date", "commit", "machine", "timings_s"):
        assert key in res
    clus = res["sections"]["clustering"]
    assert "default initialization (seed 0; --weights none)" in clus["source"]  # none means none here too
    methods = {row["method"] for row in clus["rows"]}
    assert "kcengine" in methods
    assert {row["workload"] for row in clus["rows"]} == {"a_sweep", "b_filters", "c_kernels", "d_element"}
    for row in clus["rows"]:
        assert row["seconds"] > 0
    inf = res["sections"]["inference"]
    # eager dense in both layouts, then the dense model frozen for inference (TorchScript) in channels-last
    assert [(row["batch"], row["memory_format"]) for row in inf["rows"]] == [
        (b, f) for b in (1, 8) for f in ("nchw", "channels_last", "channels_last, dense frozen")]
    assert all(row["dense_eager_ms"] > 0 for row in inf["layers"])
    assert all(row["rel_diff_vs_dense"] < 1e-3 for row in inf["rows"])  # same weights, fused: same outputs
    sizes = {s["what"]: s for s in inf["sizes"]}
    assert sizes["unique conv weights"]["ratio"] > 3.5
    for name in ("report.md", "results.json", "clustering.csv", "clustering_speedup.png", "inference.csv",
                 "inference_layers.csv", "inference_layers.png"):
        assert (out / name).is_file(), name
    from kcengine.commands.bench import OUT_FILES

    assert {p.name for p in out.iterdir()} <= set(OUT_FILES)  # the names cli.main checks before any work


@pytest.mark.parametrize("args,match", [
    (["--model", "resnet999"], "--model 'resnet999' is not a supported model"),
    (["--model", "resnet20", "--weights", "/nonexistent/w.th"], "--weights /nonexistent/w.th: no such file"),
    (["--model", "resnet20", "--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such folder"),
    (["--model", "resnet20", "--ratio", "1.5"], "--ratio must be in (0, 1], got 1.5"),
    (["--model", "resnet20", "--sections", "speed"], "--sections: unknown section 'speed'"),
    (["--model", "resnet20", "--max-problems", "0"], "--max-problems must be >= 1, got 0"),
    (["--model", "resnet20", "--max-problems", "-1"], "--max-problems must be >= 1, got -1"),
    (["--model", "resnet20", "--sections", ""], "--sections '' names no section"),
    (["--model", "resnet20", "--sections", " , "], "--sections ' , ' names no section"),
    (["--model", "resnet20", "--weights", "/"], "--weights /: a folder, not a checkpoint file"),
])
def test_bench_user_errors_are_one_line(args, match):
    r = run_cli("bench", *args)
    assert r.returncode == 2
    assert match in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bench_weights_of_another_model_are_refused_before_any_work(tmp_path):
    import torch

    from kcengine.models import CifarResNet

    path = tmp_path / "r20.th"
    torch.save(CifarResNet(20).state_dict(), path)
    r = run_cli("bench", "--model", "resnet32", "--quick", "--weights", str(path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--weights {path}: could not be loaded into resnet32 (" in r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_one_problem_per_workload_and_the_torch_backend_on_cpu(tmp_path):
    """--max-problems 1 keeps the first problem of each workload (it divided by zero); --backend torch on the CPU
    times the torch reference beside the cpu solver (it was ignored)."""
    out = tmp_path / "o"
    r = run_cli("bench", "--model", "resnet20", "--quick", "--sections", "clustering", "--max-problems", "1",
                "--weights", "none", "--backend", "torch", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["sections"]["clustering"]["rows"]
    assert {row["problems"] for row in rows} == {1}
    assert {"kcengine", "torch"} <= {row["method"] for row in rows}


def test_bench_refuses_a_clustered_model_as_weights(tmp_path):
    # prune/finetune --out write a compact clustered model; bench would find no dense conv to cluster in it
    import torch

    import kcengine
    from kcengine.models import CifarResNet

    torch.manual_seed(0)
    clustered, _ = kcengine.compress(CifarResNet(20), ratio=0.5)
    path = tmp_path / "model.pt"
    kcengine.save_compressed(clustered, path)
    r = run_cli("bench", "--model", "resnet20", "--quick", "--weights", str(path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--weights {path}: a clustered model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bench_explicit_pretrained_weights_that_are_missing_is_an_error_in_every_section(tmp_path):
    """Without --weights the clustering section falls back to the default init (its speed needs only the
    shapes) and says so; an explicit --weights pretrained that the hub cache cannot give used to fall back
    the same way, silently benchmarking untrained filters under the name the user asked for."""
    for section in ("clustering", "inference"):
        r = run_cli("bench", "--model", "resnet18", "--sections", section, "--quick", "--weights", "pretrained",
                    "--out", str(tmp_path / section), TORCH_HOME=str(tmp_path / "empty_hub"))
        assert r.returncode == 2, (section, r.stderr[-2000:])
        assert "pretrained" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / section).exists()


def test_bench_data_folder_of_wrong_layout_is_said_before_any_section_runs(tmp_path):
    """All sections asked for: the wrong folder is reported at once, not after the clustering and inference
    sections (minutes in a default run) have written a partial output folder."""
    (tmp_path / "junk.txt").write_text("not cifar")
    r = run_cli("bench", "--model", "resnet20", "--data", str(tmp_path), "--quick", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr[-1000:]
    assert "not a CIFAR-10 python-batches folder" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_reads_the_data_folder_before_any_section_runs(tmp_path, shared_data):
    """A damaged test_batch was found by the accuracy section, after the clustering section had written its files
    into --out (an earlier run's folder came out half old, half new)."""
    import shutil

    data = tmp_path / "cifar-10-batches-py"
    shutil.copytree(shared_data / "cifar-10-batches-py", data)
    (data / "test_batch").write_bytes((data / "test_batch").read_bytes()[:1000])
    r = run_cli("bench", "--model", "resnet20", "--data", str(data), "--quick", "--sections", "clustering,accuracy",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr[-1000:]
    assert "test_batch is not a readable CIFAR python batch" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_cuda_errors_without_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = run_cli("bench", "--device", "cuda")
    assert r.returncode == 2 and "no CUDA device is available" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("bench", "--backend", "cuda")
    assert r.returncode == 2 and "--backend cuda:" in r.stderr and "Traceback" not in r.stderr


def test_env_lists_backends_and_reasons():
    r = run_cli("env", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backends"]["cpu"] == "available" and info["backends"]["torch"] == "available"
    assert info["kmeans_solver_build"] in ("generic", "avx2", "avx512")
    for key in ("torch", "numpy", "cpu_features", "openmp_threads", "nvcc"):
        assert key in info
    # the override every backend='auto' call takes: env said nothing of it, a bad value included
    r = run_cli("env", "--json", KCENGINE_BACKEND="gpu")
    assert "'gpu': not a backend" in json.loads(r.stdout)["KCENGINE_BACKEND"]
    r = run_cli("env", "--json", KCENGINE_BACKEND="torch")
    assert json.loads(r.stdout)["KCENGINE_BACKEND"] == "'torch': every backend='auto' call runs it"
    r = run_cli("env", "--json", KCENGINE_BACKEND="")
    assert json.loads(r.stdout)["KCENGINE_BACKEND"].startswith("not set")


def test_bench_negative_recover_epochs_is_a_user_error():
    r = run_cli("bench", "--model", "resnet20", "--recover-epochs", "-1")
    assert r.returncode == 2 and "--recover-epochs must be >= 0, got -1" in r.stderr


def test_summary_puts_channels_last_first_whatever_the_measurement_order():
    from kcengine.commands.bench import _summary

    inf = [{"batch": 1, "memory_format": "channels_last", "speedup": 3.0},
           {"batch": 1, "memory_format": "nchw", "speedup": 1.9},
           {"batch": 32, "memory_format": "nchw", "speedup": 2.4},
           {"batch": 32, "memory_format": "channels_last", "speedup": 2.9}]
    rows = {r["what"]: r["value"] for r in _summary({"sections": {"inference": {"rows": inf}}, "timings_s": {}})}
    assert rows["inference batch 1: clustered vs dense"] == "3.00x channels_last, 1.90x nchw"
    assert rows["inference batch 32: clustered vs dense"] == "2.90x channels_last, 2.40x nchw"


def test_bench_accuracy_section_reports_what_compress_and_evaluate_give(tmp_path):
    """The accuracy section with a checkpoint and a CIFAR folder (it ran in no test: without --data it is
    skipped). Each row's accuracies are checked against compress and top-1 computed here on the same images;
    the recovered accuracy against finetune run here with the same arguments."""
    import pickle

    import numpy as np
    import torch

    import kcengine
    from kcengine.cli import main
    from kcengine.data import cifar10_dataset, make_loader
    from kcengine.evaluate import top1_accuracy
    from kcengine.models import CifarResNet, load_model
    from kcengine.train.finetune import RECOMMENDED_BATCH

    rng = np.random.default_rng(0)
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for name, n in [("test_batch", 40)] + [(f"data_batch_{i}", 6) for i in range(1, 6)]:
        with open(data / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20.th"
    torch.save(CifarResNet(20).state_dict(), ckpt)
    out = tmp_path / "report"
    assert main(["bench", "--model", "resnet20", "--sections", "accuracy", "--quick", "--weights", str(ckpt),
                 "--data", str(data), "--recover-epochs", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["sections"]["accuracy"]["rows"]
    assert [(r["granularity"], r["plan"]) for r in rows] == [("filter", "ratio 0.5"), ("element", "ratio 0.5")]
    assert (out / "accuracy.csv").is_file() and (out / "accuracy_vs_unique.png").read_bytes()[:4] == b"\x89PNG"

    model = load_model("resnet20", str(ckpt)).model
    test = cifar10_dataset(data, "test")
    x, y = test.images, test.labels
    assert rows[0]["accuracy_before"] == pytest.approx(top1_accuracy(model, x, y))
    for r in rows:
        small, rep = kcengine.compress(model, ratio=0.5, granularity=r["granularity"], seed=0)
        assert r["accuracy_after"] == pytest.approx(top1_accuracy(small, x, y))
        assert r["compression"] == pytest.approx(rep.compression_ratio)
    assert "accuracy_recovered" not in rows[1]  # element granularity is not finetuned
    small, _ = kcengine.compress(model, ratio=0.5, seed=0)
    train = cifar10_dataset(data, "train")
    ref = kcengine.finetune(small, make_loader(train, RECOMMENDED_BATCH, shuffle=True, seed=0), mode="centroids",
                            teacher=model, epochs=1, output_calibration=True, eval_data=(x, y), progress=False)
    assert ref.accuracy is not None
    assert rows[0]["recover_epochs"] == 1 and rows[0]["accuracy_recovered"] == pytest.approx(ref.accuracy)


def test_bench_weights_pretrained_takes_the_checkpoint_beside_the_shared_data(shared_data, tmp_path):
    """The default found resnet20's published checkpoint in ../shared/data/checkpoints, and eval's --weights
    pretrained took it, but bench's said it was not in the torch hub cache ("downloading is off")."""
    import hashlib

    from kcengine.cli import main
    from kcengine.models import CIFAR_CHECKPOINT_URLS, hub_cache_path

    if hub_cache_path(CIFAR_CHECKPOINT_URLS["resnet20"]).is_file():
        pytest.skip("the hub cache holds the checkpoint: the shared copy is not needed")
    out = tmp_path / "o"
    assert main(["bench", "--model", "resnet20", "--weights", "pretrained", "--quick", "--sections", "accuracy",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    ckpt = next((shared_data / "checkpoints").glob("resnet20-*.th"))
    assert ckpt.name in json.dumps(res)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest().startswith(ckpt.stem.rsplit("-", 1)[-1])
