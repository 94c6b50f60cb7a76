"""Stage 2: train the natural- and adversarial-MI estimators E_n, E_a on a frozen target (paper Eq. 5).

The target h_θ0 (``--pre-target``, stage 1's best_model.pth) stays frozen in eval mode. Per
batch, x̃ = PGD(h_θ0, x), n = x̃ − x, and R/W are the target's right/wrong samples (Eq. 6).
``--objective release`` (default) minimises the release's cosine-and-sum losses, whose
constants are flags; ``--objective paper`` maximises Eq. 5 literally on W (PAPER.md §5).

Each epoch writes the Fig. 4 table (mean natural/adversarial MI of x and x̃ on R and W of the
evaluation split: val with --val-size, else test) into metrics.jsonl and mi_table.png.
Model selection: none. The four estimator files are rewritten every epoch (best = last, as
the release kept its last epoch): the table is a diagnostic, and a wider gap in it need not
mean a better estimator for stage 3. Writes <model-dir>/local_n_model.pth, global_n_model.pth,
local_a_model.pth, global_a_model.pth, last.pth, config.json, metrics.jsonl, mi_table.png,
curves.png."""
import torch.nn as nn

from utils.cli import (
    Parser,
    add_stage2_args,
    check_non_negative,
    estimator_run,
    estimator_spec,
    finish_stage2_args,
    number,
    stage2_spec,
)
from utils.mi.estimators import build_estimators, estimator_best_files
from utils.mi.objectives import estimator_loss_paper, estimator_loss_release
from utils.mi.patterns import select_samples
from utils.script import run_main
from utils.training.stage2 import (
    ReleasePasses,
    evaluate_mi_table,
    fit_estimators,
    global_batch,
    mi_vectors,
    prepare,
)


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    add_stage2_args(p, model_dir="checkpoints/mi_estimator", epochs=25, batch_size=400, milestones=(10, 20),
                    gamma=0.1)
    p.add_argument("--objective", default="release", choices=("release", "paper"),
                   help="release: the release's losses (produced the paper's numbers); paper: Eq. 5 as printed")
    p.add_argument("--cos-weight", type=number, default=5.0, help="release objective: weight w of the |cos| terms")
    p.add_argument("--r-weight", type=number, default=0.5, help="release objective: weight r of the L_R terms")
    p.add_argument("--a-r-cos-weight", type=number, default=8.0,
                   help="release objective: weight of E_a's |1 − cos| term on R")
    p.add_argument("--a-r-sum-weight", type=number, default=0.1,
                   help="release objective: weight of E_a's Σ_R a_a(x̃)/|R| term")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    finish_stage2_args(p, args)
    check_non_negative(p, args, "cos_weight", "r_weight", "a_r_cos_weight", "a_r_sum_weight")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup = prepare(stage2_spec(args))
    estimators = nn.ModuleDict(build_estimators(estimator_spec(args, setup.info), setup.target, setup.device))

    def step(x, y):
        shard = setup.attack_batch(x, y, args.num_steps)
        b = global_batch(shard)
        sel = select_samples(b.logits_nat, b.logits_adv, b.y, over_batch=args.quirks.selection)
        passes = ReleasePasses(estimators) if args.quirks.passes else None
        mi = mi_vectors(estimators, b, args.va_mode, quirks=args.quirks)
        if passes is not None:
            passes.finish(b, sel)
        if args.objective == "release":
            loss_n, loss_a = estimator_loss_release(*mi, sel, cos_weight=args.cos_weight, r_weight=args.r_weight,
                                                    a_r_cos_weight=args.a_r_cos_weight,
                                                    a_r_sum_weight=args.a_r_sum_weight)
        else:
            loss_n, loss_a = estimator_loss_paper(*mi, sel.wrong)
        # train_acc is the target's clean accuracy on the (augmented) training batches.
        return loss_n + loss_a, shard.logits_nat, {"train_loss_n": loss_n.detach(), "train_loss_a": loss_a.detach(),
                                                   "train_w_size": sel.wrong.sum(), "train_r_size": sel.right.sum()}

    run = estimator_run(args, setup, estimators)
    first_epoch = run.start()  # 1, or the epoch after last.pth's with --resume
    fit_estimators(run, first_epoch, setup, estimators, step,
                   lambda: evaluate_mi_table(setup, estimators),
                   best=estimator_best_files(estimators))


if __name__ == "__main__":
    run_main(main)
