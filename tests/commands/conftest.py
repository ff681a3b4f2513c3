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
