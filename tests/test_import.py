"""`import kcengine` must not initialize a GPU nor import cupy or triton."""
import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, kcengine\n"
        "bad = [m for m in ('cupy', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "torch = sys.modules.get('torch')\n"
        "assert torch is None or not torch.cuda.is_initialized(), 'CUDA initialized on import'\n"
        "assert all(callable(getattr(kcengine, n, None)) or n in ('nn', 'evaluate', '__version__')\n"
        "           for n in kcengine.__all__)\n"
        "assert callable(kcengine.evaluate.adversarial_accuracy) and callable(kcengine.evaluate.evaluate)\n"
        "assert kcengine.ClusteredConv2d is kcengine.nn.ClusteredConv2d\n"
        "assert 'torchvision' not in sys.modules and 'kcengine.models' not in sys.modules\n"
        "assert callable(kcengine.models.load_model) and len(kcengine.models.CIFAR_MEAN) == 3  # on first use\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_package_declares_its_type_hints():
    """A py.typed marker ships beside the modules (PEP 561), so type checkers read kcengine's annotations and
    the native module's stub (_core.pyi)."""
    from pathlib import Path

    import kcengine

    root = Path(kcengine.__file__).parent
    assert (root / "py.typed").is_file() and (root / "_core.pyi").is_file()
