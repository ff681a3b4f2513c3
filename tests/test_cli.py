"""``kcengine.cli``: library errors spelled as the flags a command-line user types."""
import pytest

from kcengine.cli import flag_words

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


@pytest.mark.parametrize("argv, want", [
    (["prune", "--ration", "0.5"], "python -m kcengine prune: error: unrecognized arguments: --ration 0.5 (--ration: "
                                   "did you mean --ratio?)"),
    (["finetune", "--plan", "sensitivity", "0.5"], "python -m kcengine finetune: error: unrecognized arguments: 0.5 "
                                                  "(0.5: --plan takes one value, 'sensitivity'; write what follows it "
                                                  "as one word (e.g. sensitivity=0.5))"),
    (["eval", "--bogus"], "python -m kcengine eval: error: unrecognized arguments: --bogus"),
])
def test_a_mistyped_option_is_named_with_its_commands_usage(argv, want, capsys):
    """argparse reported a command's unknown options with the top level's usage, which names no option of the
    command; the command's own usage comes with them now, and the likely meant option."""
    from kcengine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == want
    assert err.startswith(f"usage: python -m kcengine {argv[0]} ")


@pytest.mark.parametrize("argv, want", [
    (["eval", "--attack", "fgsm", "--eps", "-1/255"], "--eps must be in [0, 1] (pixel units; 8/255 = 0.0314), "
                                                      "got '-1/255'"),
    (["eval", "--attack", "fgsm", "--eps", "-1e-3"], "--eps must be in [0, 1] (pixel units; 8/255 = 0.0314), "
                                                     "got '-1e-3'"),
    (["prune", "--ratio", "-.5"], "--ratio must be a ratio in (0, 1], got -0.5"),
])
def test_a_value_starting_with_a_dash_reaches_the_options_own_check(argv, want, capsys, tmp_path):
    """argparse takes only plain negative numbers after an option (-3, -0.5): ``--eps -1/255`` was "expected one
    argument".  The option's own range message comes now, and nothing is written."""
    from kcengine.cli import main

    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(f"error: {want}")
    assert not (tmp_path / "out").exists()
