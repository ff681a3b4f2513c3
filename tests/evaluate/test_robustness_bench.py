"""kcengine.bench.robustness: the --attacks syntax and its errors (the attacks themselves: test_robustness)."""
import pytest

from kcengine.bench.robustness import main, parse_attacks


def test_attacks_parse_in_255ths():
    assert parse_attacks("fgsm:1,pgd:2") == [("fgsm", 1 / 255), ("pgd", 2 / 255)]
    assert parse_attacks(" pgd:0.5 ") == [("pgd", 0.5 / 255)]
    for bad in ("cw:1", "pgd", "pgd:x", "fgsm:300", "pgd:-1"):
        with pytest.raises(ValueError, match="is not fgsm:N or pgd:N"):
            parse_attacks(bad)


def test_cli_errors_name_the_value(capsys):
    for argv, msg in ((["--attacks", "pgd:x"], "'pgd:x' is not fgsm:N"), (["--ratios", "0"], "--ratios must be"),
                      (["--ratios", "x"], "--ratios must be comma-separated numbers in (0, 1], got 'x'"),
                      (["--steps", "0"], "--steps must be >= 1, got 0"),
                      # before any work: --epochs used to fail after the dense rows were written over the record
                      (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
                      (["--threads", "0"], "--threads must be >= 1, got 0")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and msg in capsys.readouterr().err
