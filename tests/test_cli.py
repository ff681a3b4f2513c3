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
