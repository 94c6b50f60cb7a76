"""Stage 2, plain maximisation ("MIM", paper Eq. 4): train E_n and E_a on a frozen target.

E_n maximises Î_n(x, h(x)) over the correctly classified samples C; E_a maximises
Î_a(n, h(x̃)) over the samples whose attack succeeded (PAPER.md §5). Same flags, outputs and
per-epoch Fig. 4 table as train_MI_estimator.py; the release's defaults for this variant are
batch 200, 50 epochs, milestones [20, 30, 40], γ 0.5.

``--standard-mi`` instead trains ONE estimator by plain maximisation of the standard MI
Î(x̃; h(x̃)) of adversarial inputs over all samples (local net on x̃ itself): the estimator of
the WMIM baseline (PAPER.md §6, after Zhu et al. 2020). It is saved as local_std_model.pth and
global_std_model.pth, and the table becomes the mean standard MI of x and x̃.

Model selection: none; the estimator files are rewritten every epoch (best = last, as the
release kept its last epoch)."""
import torch.nn as nn

from utils.cli import Parser, add_stage2_args, estimator_run, estimator_spec, finish_stage2_args, stage2_spec
from utils.mi.estimators import STANDARD_FILES, build_estimators, build_one_estimator, estimator_best_files
from utils.mi.objectives import estimator_loss_max
from utils.mi.patterns import attack_succeeded, select_samples
from utils.script import run_main
from utils.training.stage2 import (
    evaluate_mi_table,
    evaluate_standard_mi,
    fit_estimators,
    global_batch,
    prepare,
)


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    add_stage2_args(p, model_dir="checkpoints/mi_estimator_only_max", epochs=50, batch_size=200,
                    milestones=(20, 30, 40), gamma=0.5)
    p.add_argument("--standard-mi", action="store_true",
                   help="train one estimator of the standard MI Î(x̃; h(x̃)) (WMIM) instead of E_n and E_a")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    return finish_stage2_args(p, args)


def main(argv=None):
    args = parse_args(argv)
    setup = prepare(stage2_spec(args))

    if args.standard_mi:
        estimator = build_one_estimator(estimator_spec(args, setup.info), setup.target, setup.device)
        estimators = nn.ModuleDict({"standard": estimator})

        def step(x, y):
            shard = setup.attack_batch(x, y, args.num_steps)
            b = global_batch(shard)
            loss = -estimator.mi(b.x_adv, b.g_adv, args.va_mode, quirks=args.quirks).mean()
            fooled = attack_succeeded(b.logits_adv, b.y, over_batch=args.quirks.selection)
            return loss, shard.logits_nat, {"train_fooled": fooled.sum()}

        run = estimator_run(args, setup, estimators)
        fit_estimators(run, run.start(), setup, estimators, step,
                       lambda: evaluate_standard_mi(setup, estimator),
                       best={STANDARD_FILES["local"]: estimator.local, STANDARD_FILES["global"]: estimator.global_})
        return

    estimators = nn.ModuleDict(build_estimators(estimator_spec(args, setup.info), setup.target, setup.device))
    e_n, e_a = estimators["natural"], estimators["adversarial"]

    def step(x, y):
        shard = setup.attack_batch(x, y, args.num_steps)
        b = global_batch(shard)
        sel = select_samples(b.logits_nat, b.logits_adv, b.y, over_batch=args.quirks.selection)
        fooled = attack_succeeded(b.logits_adv, b.y, over_batch=args.quirks.selection)
        # Eq. 4 needs only these two of the four MI terms (one pass of each net, as in the release).
        loss_n, loss_a = estimator_loss_max(e_n.mi(b.x, b.g_nat, args.va_mode, quirks=args.quirks),
                                            e_a.mi(b.n, b.g_adv, args.va_mode, quirks=args.quirks),
                                            sel.correct, fooled)
        return loss_n + loss_a, shard.logits_nat, {"train_loss_n": loss_n.detach(), "train_loss_a": loss_a.detach(),
                                                   "train_c_size": sel.correct.sum(), "train_fooled": fooled.sum()}

    run = estimator_run(args, setup, estimators)
    first_epoch = run.start()  # 1, or the epoch after last.pth's with --resume
    fit_estimators(run, first_epoch, setup, estimators, step,
                   lambda: evaluate_mi_table(setup, estimators), best=estimator_best_files(estimators))


if __name__ == "__main__":
    run_main(main)
