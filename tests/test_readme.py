"""The README's Python snippets run as written (with a small model and loader for the names they assume)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_its_snippets():
    blocks = _python_blocks()
    assert any("kcengine.kmeans(" in b for b in blocks)
    assert any("fuse_for_inference" in b for b in blocks)


def test_readme_snippets_run(tmp_path, monkeypatch):
    """Every python block of the README, in order, in one namespace: `model` is a CIFAR resnet20 (random
    weights), `train_loader` a 16-image loader, `x` a batch; each name a snippet defines is then checked
    for what its comment says."""
    from kcengine.models.cifar_resnet import cifar_resnet

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    ns = {"model": cifar_resnet(20).eval(), "x": torch.randn(2, 3, 32, 32),
          "train_loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), ns)
    import kcengine
    from kcengine.nn import ClusteredConv2d

    w = ns["w"]
    assert ns["res"].centroids.shape == (16, 576) and ns["res"].labels.shape == (64,)
    assert [c.shape for c in ns["batch"].centroids] == [(256, 9), (8, 576)]
    assert len(ns["sweep"]) == 63
    assert ns["opt"].centroids.shape == (10, 1)
    small, tiny = ns["small"], ns["tiny"]
    assert {m.granularity for m in small.modules() if isinstance(m, ClusteredConv2d)} == {"filter"}
    tiny_layers = {n: m for n, m in tiny.named_modules() if isinstance(m, ClusteredConv2d)}
    assert tiny_layers and all(n.startswith("layer") for n in tiny_layers)  # the stem stays dense
    assert all(m.granularity == "kernel" and m.num_clusters == 256 for m in tiny_layers.values())
    assert isinstance(tiny.conv1, torch.nn.Conv2d)
    fresh, _ = kcengine.compress(ns["model"], ratio=0.5)  # clustered alone: no refit, no training
    pairs = [(a, b) for a, b in zip(small.modules(), fresh.modules()) if isinstance(a, ClusteredConv2d)]
    assert len(pairs) == 19 and all(a.num_clusters == b.num_clusters for a, b in pairs)  # finetune's plan=0.5
    assert any(not torch.equal(a.codebook, b.codebook) for a, b in pairs)  # `small` is the finetuned model
    loaded = kcengine.load_compressed(tmp_path / "small.pt", cifar_resnet(20))  # the file holds no builder
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ns["x"]), small.eval()(ns["x"]))
        torch.testing.assert_close(ns["y"], small(ns["x"]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ns["program"].module()(ns["x"]), ns["y"], rtol=1e-4, atol=1e-4)
    assert w.shape == (64, 64, 3, 3)


def test_readme_cli_lines_parse():
    """Every `python -m kcengine ...` / `torchrun ... -m kcengine ...` line of the README's bash blocks names a
    command and options the CLI accepts (what each command does is tested in tests/commands)."""
    import shlex

    from kcengine.cli import build_parser

    parser, _ = build_parser()
    lines = [ln.split("#")[0].strip() for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
             for ln in b.splitlines()]
    argvs = []
    for ln in lines:
        for part in ln.split("&&"):
            words = shlex.split(part)
            if "kcengine" in words and "-m" in words and words[words.index("kcengine") - 1] == "-m":
                argvs.append(words[words.index("kcengine") + 1:])
    assert len(argvs) >= 8 and {a[0] for a in argvs} >= {"bench", "eval", "prune", "finetune", "sweep"}
    for argv in argvs:
        args = parser.parse_args(argv)
        assert args.command == argv[0]
