"""``kcengine.cli``: library errors spelled as flags, and the --out folder's file names checked before any work."""
import importlib

import pytest
import torch

from kcengine.cli import COMMANDS, flag_words, main
from kcengine.models import CifarResNet

FLAGS = {"eval_batch_size": "--batch-size", "plan": "--plan", "stage_epochs": "--stage-epochs",
         "resume=False": "--no-resume", "another checkpoint_dir": "another --checkpoint-dir"}


@pytest.mark.parametrize("msg, want", [
    # a message opening with a keyword opens with its flag, and its value follows "got" alone
    ("eval_batch_size must be an int >= 1, got eval_batch_size=0", "--batch-size must be an int >= 1, got 0"),
    ("stage_epochs[1] must be an int >= 0, got stage_epochs[1]=-1", "--stage-epochs[1] must be an int >= 0, got -1"),
    # elsewhere keyword=value reads --flag value, and a bare keyword= the flag alone
    ("mode='progressive' needs plan= (e.g. plan={'ratio': 0.5})", "mode='progressive' needs --plan (e.g. --plan "
                                                                  "{'ratio': 0.5})"),
    # phrases are replaced whole
    ("settings differ; use another checkpoint_dir or resume=False", "settings differ; use another --checkpoint-dir "
                                                                    "or --no-resume"),
    # only whole keywords: a longer name ending in one, or a flag already spelled, is left alone
    ("layer_plan=3 and --plan=x", "layer_plan=3 and --plan=x"),
    ("plans differ", "plans differ"),
])
def test_flag_words(msg, want):
    assert flag_words(msg, FLAGS) == want


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "r20.th"
    torch.save(CifarResNet(20).state_dict(), p)
    return p


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "env"])
def test_a_folder_where_a_command_writes_a_file_is_refused_before_any_work(command, ckpt, tmp_path, capsys,
                                                                           monkeypatch):
    """Every name a command writes in --out (its OUT_FILES) is checked before the command runs: a folder standing
    there was a traceback after the work (finetune lost the trained model)."""
    mod = importlib.import_module(f"kcengine.commands.{command}")
    assert mod.OUT_FILES
    monkeypatch.setattr(mod, "run", lambda args: pytest.fail("the command ran"))
    for name in mod.OUT_FILES:
        out = tmp_path / command / name.replace(".", "_")
        (out / name).mkdir(parents=True)
        assert main([command, "--weights", str(ckpt), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {out / name} is a folder, where {command} writes its file {name}" in err
