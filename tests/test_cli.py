"""The flags the scripts share (utils/cli.py): fractions as numbers, both spellings of a long
option, and one-line errors with exit status 2."""
import argparse
import math

import pytest

from utils.cli import (
    TF32_HELP,
    Parser,
    add_attack_args,
    check_non_negative,
    check_positive,
    finish_attack_args,
    linf_budget_problem,
    number,
)


def test_number_reads_fractions_and_plain_floats():
    assert number("8/255") == 8 / 255
    assert number("0.5") == 0.5
    assert number("-2") == -2.0
    assert number("0.5/255") == pytest.approx(0.5 / 255, rel=1e-15)  # budgets are written like that
    assert number("1e-3/2") == pytest.approx(5e-4, rel=1e-15)


@pytest.mark.parametrize("text", ["x", "inf", "-inf", "nan", "1/0", "8/", "1/2/3", "inf/2", "0.5/x"])
def test_number_refuses_what_is_not_a_finite_number(text):
    with pytest.raises(argparse.ArgumentTypeError, match="number"):
        number(text)


def test_parser_long_option_answers_to_both_spellings():
    p = Parser(prog="prog")
    p.add_argument("--a-b", type=int, default=0)
    assert p.parse_args(["--a-b", "3"]).a_b == 3
    assert p.parse_args(["--a_b", "4"]).a_b == 4
    assert p.parse_args([]).a_b == 0


def test_parser_error_is_one_line_and_status_2(capsys):
    p = Parser(prog="prog")
    p.add_argument("--a-b", type=number)
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--a-b", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: error:") and len(err.strip().splitlines()) == 1
    assert "usage" not in err


def test_linf_budget_problem_names_the_0_255_spelling():
    problem = linf_budget_problem(8, "--epsilon")
    assert problem is not None and "--epsilon" in problem and "8/255" in problem
    assert linf_budget_problem(1, "--epsilon") is not None
    assert linf_budget_problem(8 / 255, "--epsilon") is None


def _attack_parser():
    p = Parser(prog="prog")
    add_attack_args(p)
    return p


def test_finish_attack_args_fills_the_norm_dependent_defaults():
    p = _attack_parser()
    linf = finish_attack_args(p, p.parse_args([]))
    assert linf.epsilon == pytest.approx(8 / 255) and linf.step_size == pytest.approx(2 / 255)
    l2 = finish_attack_args(p, p.parse_args(["--distance", "l_2"]))
    assert l2.epsilon == 0.5 and l2.step_size == 0.125
    given = finish_attack_args(p, p.parse_args(["--epsilon", "4/255", "--step_size", "1/255"]))
    assert given.epsilon == 4 / 255 and given.step_size == 1 / 255


@pytest.mark.parametrize("argv,fragment", [
    (["--epsilon", "8"], "8/255"),
    (["--epsilon", "0"], "--epsilon"),
    (["--step-size", "-1"], "--step-size"),
    (["--num-steps", "0"], "--num-steps"),
])
def test_finish_attack_args_refuses_budgets_that_cannot_be_meant(capsys, argv, fragment):
    p = _attack_parser()
    with pytest.raises(SystemExit) as exit_:
        finish_attack_args(p, p.parse_args(argv))
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err


def test_an_l2_budget_of_one_or_more_is_allowed():
    p = _attack_parser()
    assert finish_attack_args(p, p.parse_args(["--distance", "l_2", "--epsilon", "2"])).epsilon == 2.0


def test_check_positive_exits_with_status_2_on_a_bad_value(capsys):
    p = Parser(prog="prog")
    check_positive(p, argparse.Namespace(lr=0.1, beta=None), "lr", "beta")  # None: not given, fine
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(SystemExit) as exit_:
            check_positive(p, argparse.Namespace(lr=0.1, beta=bad), "lr", "beta")
        assert exit_.value.code == 2
        assert "--beta must be positive" in capsys.readouterr().err


def test_check_non_negative_exits_with_status_2_on_a_bad_value(capsys):
    p = Parser(prog="prog")
    check_non_negative(p, argparse.Namespace(weight_decay=0.0, alpha=None), "weight_decay", "alpha")
    for bad in (-1e-9, math.nan):
        with pytest.raises(SystemExit) as exit_:
            check_non_negative(p, argparse.Namespace(weight_decay=bad), "weight_decay")
        assert exit_.value.code == 2
        assert "--weight-decay must not be negative" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_standard", "train_MI_estimator", "train_MI_estimator_only_max",
                                    "train_MIAT", "test_comparison"])
def test_every_script_takes_tf32_off_by_default(script):
    import importlib

    parser = importlib.import_module(script).build_parser()
    (action,) = [a for a in parser._actions if "--tf32" in a.option_strings]
    assert action.default is False and action.help == TF32_HELP
