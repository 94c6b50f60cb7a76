"""run_pipeline.py: the demo preset end to end on tiny synthetic data, skipping and resuming."""
import json

from tests.helpers import assert_user_error, run_script

TINY = ["--preset", "demo", "--method", "namid", "--dataset", "synthetic", "--train-limit", "64",
        "--test-limit", "32", "--epochs", "1", "--warm-up-epochs", "0", "--batch-size", "32", "--va-hsize", "16",
        "--num-steps", "2", "--eval-steps", "2", "--no-progress",
        "--eval-args", "--attacks pgd5 --n-examples 16 --eps-sweep 0,0.05,0.1"]


def test_demo_runs_end_to_end_and_fills_every_report_section(tmp_path, capsys):
    code, out, err = run_script(capsys, "run_pipeline", [*TINY, "--out-dir", tmp_path])
    assert code == 0, err
    assert "synthetic" in out
    report = (tmp_path / "report.md").read_text()
    for section in ("## Our results", "## The paper's Table 1", "## MI of natural and adversarial inputs",
                    "### after Eq. 5 training", "### after Eq. 4 (MIM)", "## Accuracy against ε",
                    "## Stages run in this invocation"):
        assert section in report, section
    assert "| Standard AT |" in report and "| NAMID |" in report and "83.39" in report
    for name in ("standard/best_model.pth", "mi_estimator/global_a_model.pth", "mi_estimator/mi_table.png",
                 "mi_estimator_only_max/mi_table.png", "namid/target_model.pth", "results.json", "eps_sweep.png"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results

    # Running it again skips every stage; the report is rewritten.
    code, out, err = run_script(capsys, "run_pipeline", [*TINY, "--out-dir", tmp_path])
    assert code == 0, err
    assert out.count("skipped") == 5


def test_interrupted_stage_resumes(tmp_path, capsys):
    argv = [*TINY, "--out-dir", tmp_path]
    code, _, err = run_script(capsys, "run_pipeline", argv)
    assert code == 0, err
    # Pretend stage 3 was cut short after epoch 1 of 2: the next run resumes it.
    code, out, err = run_script(capsys, "run_pipeline", [*argv, "--stage3-args", "--epochs 2"])
    assert code == 0, err
    assert "NAMID: train_MIAT.py" in out and "(resuming)" in out
    lines = (tmp_path / "namid" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2]


def test_unknown_override_is_one_line(tmp_path, capsys):
    result = run_script(capsys, "run_pipeline", ["--preset", "demo", "--no-such-flag", "3", "--out-dir", tmp_path])
    assert_user_error(result, "--no-such-flag")


def test_every_preset_gives_stage_2_and_stage_3_the_same_estimator_shape(tmp_path):
    """Stage 3 loads stage 2's files: both must parse the same --va-hsize and internal flags."""
    import run_pipeline
    import train_MI_estimator
    import train_MIAT

    for preset in ("demo", "paper-cifar10", "paper-tinyimagenet"):
        args, extra = run_pipeline.build_parser().parse_known_args(["--preset", preset, "--out-dir", str(tmp_path)])
        pipe = run_pipeline.Pipeline(args, extra)
        two = train_MI_estimator.parse_args(pipe.argv(train_MI_estimator, "stage2", "--pre-target", "x"))
        three = train_MIAT.parse_args(pipe.argv(train_MIAT, "stage3", "--mi-dir", "x"))
        for flag in ("va_hsize", "is_internal", "is_internal_last", "mi_mode", "arch", "dataset"):
            assert getattr(two, flag) == getattr(three, flag), (preset, flag)
