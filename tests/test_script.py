"""utils/script.py: how a script ends on a user mistake, on Ctrl-C and on success."""
import pytest

from utils.script import NOTHING_TO_RESUME, Interrupted, UserError, run_main


def _exit(main, capsys, **kw):
    with pytest.raises(SystemExit) as exit_:
        run_main(main, **kw)
    return exit_.value.code, capsys.readouterr().err


def test_user_error_is_one_line_and_status_2(capsys):
    def main():
        raise UserError("--epsilon must be positive")

    code, err = _exit(main, capsys)
    assert code == 2 and err.strip().endswith("error: --epsilon must be positive") and "Traceback" not in err


def test_ctrl_c_in_a_run_prints_its_advice_elsewhere_the_default(capsys):
    def in_run():
        raise Interrupted("interrupted; continue with --resume")

    def before_run():
        raise KeyboardInterrupt

    assert _exit(in_run, capsys) == (130, f"{_prog()}: interrupted; continue with --resume\n")
    code, err = _exit(before_run, capsys)
    assert code == 130 and NOTHING_TO_RESUME in err
    code, err = _exit(before_run, capsys, interrupted="finished stages are kept")
    assert "finished stages are kept" in err


def test_success_returns(capsys):
    ran = []
    run_main(lambda: ran.append(1))
    assert ran == [1]


def _prog():
    import sys
    from pathlib import Path

    return Path(sys.argv[0]).name
