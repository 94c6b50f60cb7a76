"""run_pipeline.py: the demo preset end to end on tiny synthetic data, skipping and resuming."""
import json
import re

import pytest

from tests.helpers import assert_user_error, run_script

TINY = ["--preset", "demo", "--method", "namid", "--dataset", "synthetic", "--train-limit", "64",
        "--test-limit", "32", "--epochs", "1", "--warm-up-epochs", "0", "--batch-size", "32", "--va-hsize", "16",
        "--num-steps", "2", "--eval-steps", "2", "--no-progress",
        "--eval-args", "--attacks pgd5 --n-examples 16",
        "--sweep-args", "--attacks pgd5 --n-examples 16 --eps-sweep 0,0.05,0.1"]


def test_demo_runs_end_to_end_and_fills_every_report_section(tmp_path, capsys):
    code, out, err = run_script(capsys, "run_pipeline", [*TINY, "--out-dir", tmp_path])
    assert code == 0, err
    assert "synthetic" in out
    report = (tmp_path / "report.md").read_text()
    for section in ("## Our results", "## The paper's Table 1", "## MI of natural and adversarial inputs",
                    "### after Eq. 5 training", "### after Eq. 4 (MIM)", "## Accuracy against ε",
                    "## Training curves", "## Stages", "| ε = 0.05 |"):
        assert section in report, section
    # One picture per stage, each pointing at a file that exists.
    pictures = re.findall(r"\]\(([^)]*curves\.png)\)", report)
    assert len(pictures) == 4 and all((tmp_path / p).is_file() for p in pictures)
    assert "| Standard AT |" in report and "| NAMID |" in report and "83.39" in report
    # The command as it can be pasted back: quoted where a value holds spaces.
    assert "--eval-args '--attacks pgd5 --n-examples 16'" in report
    # --test-limit 32 drew a seeded subset: the 16 images are not the test set's first 16.
    assert "first 16 of a seeded subset of 32 test images (--test-limit)" in report
    for name in ("standard/best_model.pth", "mi_estimator/global_a_model.pth", "mi_estimator/mi_table.png",
                 "mi_estimator_only_max/mi_table.png", "namid/target_model.pth", "results.json", "eps_sweep.png"):
        assert (tmp_path / name).is_file(), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["Standard AT", "NAMID"]
    assert all(m["n"] == 16 and "pgd5" in m["attacks"] for m in results["models"])
    assert results["eps_sweep"]["settings"]["eps_sweep"]["epsilons"] == [0, 0.05, 0.1]

    # Running it again skips every stage; the report is rewritten.
    code, out, err = run_script(capsys, "run_pipeline", [*TINY, "--out-dir", tmp_path])
    assert code == 0, err
    assert out.count("skipped") == 4 + 2 + 1  # four stages, two evaluations, the sweep
    report = (tmp_path / "report.md").read_text()
    assert report.count("complete before, skipped") == 4 and report.count("up to date before, skipped") == 3


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
    assert "| resumed, " in (tmp_path / "report.md").read_text()


def test_a_run_without_its_checkpoints_is_refused_not_overwritten(tmp_path, capsys):
    """Committed results keep config.json and metrics.jsonl but no .pth: the pipeline must not
    take such a folder for an empty one."""
    (tmp_path / "standard").mkdir()
    finished = '{"epoch": 1, "train_loss": 1.0}\n'
    (tmp_path / "standard" / "metrics.jsonl").write_text(finished)
    result = run_script(capsys, "run_pipeline", [*TINY, "--out-dir", tmp_path])
    assert_user_error(result, str(tmp_path / "standard"), "last.pth", "--out-dir")
    assert (tmp_path / "standard" / "metrics.jsonl").read_text() == finished


def test_a_progress_bar_does_not_make_an_evaluation_stale(tmp_path):
    from run_pipeline import eval_is_current

    out = tmp_path / "e.json"
    out.write_text(json.dumps({"settings": {"argv": ["--model-dir", "m", "--no-progress"]}}))
    assert eval_is_current(out, ["--model-dir", "m"], [])
    assert not eval_is_current(out, ["--model-dir", "other"], [])


def test_unknown_override_is_one_line(tmp_path, capsys):
    result = run_script(capsys, "run_pipeline", ["--preset", "demo", "--no-such-flag", "3", "--out-dir", tmp_path])
    assert_user_error(result, "--no-such-flag")


@pytest.mark.parametrize("argv,fragment", [
    (["-epochs", "1"], "-epochs"),  # one dash
    (["stray"], "stray"),
    (["--eval-args", "--attacks pgdd"], "pgdd"),  # refused before any training
    (["--stage1-args=--resume"], "--resume"),
    (["--stage1-args", "--lr '0.1"], "--stage1-args"),
])
def test_bad_pipeline_flags_are_one_line_before_any_work(tmp_path, capsys, argv, fragment):
    assert_user_error(run_script(capsys, "run_pipeline", ["--preset", "demo", "--out-dir", tmp_path, *argv]), fragment)
    assert not (tmp_path / "standard").exists()


def test_every_preset_gives_stage_2_and_stage_3_the_same_estimator_shape(tmp_path):
    """Stage 3 loads stage 2's files: both must parse the same --va-hsize and internal flags."""
    import run_pipeline
    import train_MI_estimator
    import train_MIAT

    for preset in ("demo", "paper-cifar10", "paper-tinyimagenet", "release"):
        args, extra = run_pipeline.build_parser().parse_known_args(["--preset", preset, "--out-dir", str(tmp_path)])
        pipe = run_pipeline.Pipeline(args, extra)
        two = train_MI_estimator.parse_args(pipe.argv(train_MI_estimator, "stage2", "--pre-target", "x"))
        three = train_MIAT.parse_args(pipe.argv(train_MIAT, "stage3", "--mi-dir", "x"))
        for flag in ("va_hsize", "is_internal", "is_internal_last", "va_mode", "arch", "dataset"):
            assert getattr(two, flag) == getattr(three, flag), (preset, flag)


def dry_run(tmp_path, capsys, *flags):
    code, out, err = run_script(capsys, "run_pipeline", ["--preset", "fashion-mnist", "--out-dir", tmp_path,
                                                         "--dry-run", *flags])
    assert code == 0, err
    return [line for line in out.splitlines() if line.startswith("python ")]


def test_a_damaged_last_checkpoint_restarts_its_stage_and_a_partial_one_resumes(tmp_path, capsys):
    import torch

    (tmp_path / "standard").mkdir()
    (tmp_path / "standard" / "last.pth").write_bytes(b"half a zip")
    (tmp_path / "mi_estimator").mkdir()
    torch.save({"epoch": 1}, tmp_path / "mi_estimator" / "last.pth")  # 1 of the preset's 4 epochs
    commands = dry_run(tmp_path, capsys, "--method", "namid")
    by_script = {c.split()[1]: c for c in commands if "test_comparison" not in c}
    assert by_script["train_standard.py"].endswith("--overwrite")
    assert by_script["train_MI_estimator.py"].endswith("--resume")
    assert not by_script["train_MIAT.py"].endswith(("--resume", "--overwrite"))


def test_stage_state_reads_last_pth_through_the_safe_loader(tmp_path):
    """Whatever load_checkpoint refuses (damaged, code inside) or what holds no dict means "replace"."""
    import pickle

    import torch

    from run_pipeline import stage_state

    assert stage_state(tmp_path, "best_model.pth", 2) == "fresh"
    (tmp_path / "last.pth").write_bytes(b"half a zip")
    assert stage_state(tmp_path, "best_model.pth", 2) == "replace"
    (tmp_path / "last.pth").write_bytes(pickle.dumps(print, protocol=2))  # names code to run: refused, never run
    assert stage_state(tmp_path, "best_model.pth", 2) == "replace"
    torch.save([1, 2], tmp_path / "last.pth")
    assert stage_state(tmp_path, "best_model.pth", 2) == "replace"
    torch.save({"epoch": 2}, tmp_path / "last.pth")
    assert stage_state(tmp_path, "best_model.pth", 2) == "resume"  # the stage's output is missing
    (tmp_path / "best_model.pth").write_bytes(b"weights")
    assert stage_state(tmp_path, "best_model.pth", 2) == "done"


def test_seeds_and_ablations_plan_every_stage_and_run_nothing(tmp_path, capsys):
    commands = dry_run(tmp_path, capsys, "--method", "all", "--seeds", "0,1,2", "--ablations")
    assert not any(tmp_path.iterdir())  # a dry run writes nothing

    def stage(folder):
        hits = [c for c in commands if not c.startswith("python test_comparison.py")
                and c.split("--model-dir ")[1].split()[0] == str(tmp_path / folder)]
        assert len(hits) == 1, folder
        return hits[0]

    for s in (1, 2):
        assert f"--seed {s}" in stage(f"standard_seed{s}") and f"--seed {s}" in stage(f"namid_seed{s}")
    # Stage 2 and every NAMID variant start from the first seed's Standard AT model and estimators.
    assert f"--pre-target {tmp_path}/standard/best_model.pth" in stage("mi_estimator")
    for folder, flag in (("namid_no_adv_mi", "--no-adv-mi"), ("namid_no_nat_mi", "--no-nat-mi"),
                         ("namid_lam0", "--lam 0"), ("namid_t", "--adv-loss trades"), ("namid_m", "--adv-loss mart")):
        assert flag in stage(folder) and f"--mi-dir {tmp_path}/mi_estimator" in stage(folder), folder
    assert "--method wmim" in stage("wmim") and "--standard-mi" in stage("mi_standard")
    evals = [c for c in commands if c.startswith("python test_comparison.py")]
    assert len(evals) == 14 + 1  # one per model, then the ε sweep
    assert all("--n-examples" not in c for c in evals[:-1])  # the full test set
    sweep = evals[-1]
    assert "--eps-sweep" in sweep and "seed_1" not in sweep and "namid_lam0" not in sweep


def test_seeds_must_be_distinct_integers_and_seed_is_refused(tmp_path, capsys):
    for bad in ("0,0", "a,1", ""):
        result = run_script(capsys, "run_pipeline", ["--seeds", bad, "--out-dir", tmp_path, "--dry-run"])
        assert_user_error(result, "--seeds")
    assert_user_error(run_script(capsys, "run_pipeline", ["--seed", "3", "--out-dir", tmp_path]), "--seeds")


def test_an_evaluation_is_redone_when_its_command_or_checkpoint_changes(tmp_path):
    import os

    import run_pipeline

    model_dir = tmp_path / "namid"
    model_dir.mkdir()
    (model_dir / "target_model.pth").write_bytes(b"weights")
    (model_dir / "last.pth").write_bytes(b"resume state")
    out = tmp_path / "eval" / "namid.json"
    out.parent.mkdir()
    argv = ["--attacks", "pgd40", "--model-dir", str(model_dir), "--out", str(out)]
    out.write_text(json.dumps({"settings": {"argv": argv}, "models": []}))
    made = out.stat().st_mtime
    os.utime(model_dir / "target_model.pth", (made - 10, made - 10))
    os.utime(model_dir / "last.pth", (made + 10, made + 10))  # last.pth is not what is evaluated
    assert run_pipeline.eval_is_current(out, argv, [model_dir])
    assert not run_pipeline.eval_is_current(out, ["--attacks", "pgd20", *argv[2:]], [model_dir])
    os.utime(model_dir / "target_model.pth", (made + 10, made + 10))  # retrained since
    assert not run_pipeline.eval_is_current(out, argv, [model_dir])
    assert not run_pipeline.eval_is_current(tmp_path / "missing.json", argv, [model_dir])


def test_user_flags_win_and_eval_args_stay_out_of_the_sweep(tmp_path):
    import run_pipeline

    args, extra = run_pipeline.build_parser().parse_known_args(
        ["--preset", "fashion-mnist", "--out-dir", str(tmp_path), "--arch", "resnet18", "--eval-args", "--attacks aa",
         "--sweep-args", "--n-examples 50"])
    pipe = run_pipeline.Pipeline(args, extra)
    one = pipe.eval_argv("--model-dir", "m")
    assert one.count("--arch") == 1 and one[one.index("--arch") + 1] == "resnet18"
    assert one.index("--arch") < one.index("--model-dir")  # a default for every model, not the last one's
    assert one[len(one) - 1 - one[::-1].index("--attacks") + 1] == "aa"
    sweep = pipe.eval_argv("--model-dir", "m", sweep=True)
    assert "aa" not in sweep and sweep[len(sweep) - 1 - sweep[::-1].index("--n-examples") + 1] == "50"


def test_a_folder_of_another_seed_is_refused(tmp_path, capsys):
    (tmp_path / "standard").mkdir()
    (tmp_path / "standard" / "config.json").write_text(json.dumps({"seed": 5}))
    result = run_script(capsys, "run_pipeline", ["--preset", "fashion-mnist", "--seeds", "1", "--out-dir", tmp_path,
                                                 "--dry-run"])
    assert_user_error(result, "--seeds", "seed 5")
    result = run_script(capsys, "run_pipeline", ["--method", "wmim", "--ablations", "--out-dir", tmp_path])
    assert_user_error(result, "--ablations")


def test_release_preset_runs_the_release_settings_and_quirks(tmp_path, capsys):
    import train_MI_estimator
    import train_MI_estimator_only_max
    import train_MIAT
    from utils.mi.release_compat import Quirks

    code, out, err = run_script(capsys, "run_pipeline", ["--preset", "release", "--out-dir", tmp_path, "--dry-run"])
    assert code == 0, err
    commands = {line.split()[1]: line for line in out.splitlines() if line.startswith("python ")}
    stage2 = train_MI_estimator.parse_args(commands["train_MI_estimator.py"].split()[2:])
    assert (stage2.distance, stage2.epsilon, stage2.num_steps, stage2.step_size) == ("l_2", 0.5, 20, 0.05)
    assert stage2.quirks == Quirks.release() and stage2.dataset == "cifar10" and stage2.arch == "resnet18"
    eq4 = train_MI_estimator_only_max.parse_args(commands["train_MI_estimator_only_max.py"].split()[2:])
    assert (eq4.distance, eq4.epsilon, eq4.num_steps, eq4.step_size) == ("l_inf", 0.031, 20, 0.007)
    three = train_MIAT.parse_args(commands["train_MIAT.py"].split()[2:])
    assert (three.num_steps, three.eval_steps, three.step_size, three.warm_up_epochs, three.release_loss,
            three.val_size) == (40, 40, 0.007, 2, True, 0)
    assert three.quirks == Quirks.release() and three.lam == 0.1  # λ is unused: the release loss has no λ term
    assert "test_comparison.py" in commands and "train_standard.py" in commands
    assert "--release-compat" not in commands["test_comparison.py"]


@pytest.mark.parametrize("flags", [["--method", "wmim"], ["--method", "all"], ["--ablations"]])
def test_release_preset_refuses_what_the_release_never_ran(flags, tmp_path, capsys):
    assert_user_error(run_script(capsys, "run_pipeline", ["--preset", "release", "--out-dir", tmp_path,
                                                          "--dry-run", *flags]), "--preset release")


def test_a_stage_stopped_by_its_collapse_guard_is_named(tmp_path, capsys, monkeypatch):
    import utils.training.loop

    real = utils.training.loop.evaluate
    calls = []

    def falls_in_stage_3(model, *a, **k):
        calls.append(model)
        stats = real(model, *a, **k)
        return {**stats, "clean_acc": 50.0 if len(calls) <= 2 else 5.0}  # stage 1's epoch, stage 3's first two

    monkeypatch.setattr(utils.training.loop, "evaluate", falls_in_stage_3)
    argv = [*TINY, "--out-dir", tmp_path, "--stage3-args", "--epochs 2"]
    code, _, err = run_script(capsys, "run_pipeline", argv)
    lines = err.strip().splitlines()
    assert code == 3 and "Traceback" not in err
    assert lines[-1].startswith("run_pipeline.py: stopped: NAMID (train_MIAT.py, ")
    assert "epoch 2: held-out clean accuracy fell to 5.00 %" in lines[-1]
