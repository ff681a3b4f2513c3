"""``kcengine.cli.main``: the --out folder's file names (each command's OUT_FILES) checked before any work."""
import importlib

import pytest

from kcengine.cli import COMMANDS, main


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
