"""Fixtures shared by the CLI command tests."""
import pytest
import torch

from kcengine.models import CifarResNet


@pytest.fixture()
def ckpt(tmp_path):
    """A resnet20 checkpoint in the public format (module. prefixes, wrapped in state_dict)."""
    torch.manual_seed(0)
    m = CifarResNet(20)
    p = tmp_path / "r20.th"
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, p)
    return p


@pytest.fixture()
def imagenet_folder(tmp_path):
    """An ImageFolder tree (two class folders of PNGs), a resnet18 state dict whose only winning outputs are
    classes 0 and 1, and that model's reference inputs: the images transformed here with PIL and
    torchvision's functional ops (resize to 256, center crop 224, ImageNet normalization)."""
    from types import SimpleNamespace

    import numpy as np
    import torchvision
    import torchvision.transforms.functional as TF
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    files = []
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            size = (300 + 20 * i, 260 - 10 * i)  # (W, H): not square, so resize and crop both matter
            level = 60 + 120 * label
            a = np.clip(rng.normal(level, 50, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{i}.png"
            Image.fromarray(a).save(path)
            files.append((path, label))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.stack([TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(Image.open(p).convert("RGB"), 256), 224)),
                                  mean, std) for p, _ in files])
    labels = torch.tensor([lab for _, lab in files])
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():  # only classes 0 and 1 can win, split along the features' class difference
        model.fc = torch.nn.Identity()
        f = model(x).double()
        d = f[labels == 1].mean(0) - f[labels == 0].mean(0)
        t = (f @ d).median()  # at the median: the scores sit near the boundary, so clustering can move them
        fc = torch.nn.Linear(512, 1000)
        fc.weight.zero_()
        fc.bias.fill_(-1e4)
        fc.weight[1] = d.float()
        fc.bias[:2] = torch.tensor([float(t), 0.0])
        model.fc = fc
    weights = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), weights)
    return SimpleNamespace(root=root, weights=weights, model=model, x=x, labels=labels)
