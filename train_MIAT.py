"""Stage 3: train a fresh target model with NAMID (PAPER.md §6, paper Eq. 7–9, Algorithm 1).

L_all = L_adv + α·L_mi with the stage-2 estimators frozen. ``--adv-loss`` picks NAMID (ce),
NAMID-T (trades) or NAMID-M (mart); ``--no-adv-mi``, ``--no-nat-mi`` and ``--lam 0`` are the
ablations of Fig. 5; ``--method wmim`` is the WMIM baseline. Writes target_model.pth,
last.pth, config.json, metrics.jsonl and curves.png to --model-dir."""

from utils.attacks.base import bare_module
from utils.attacks.pgd import pgd
from utils.cli import (
    Parser,
    add_attack_args,
    add_data_args,
    add_estimator_args,
    add_model_args,
    add_optim_args,
    add_release_args,
    add_run_args,
    add_speed_args,
    check_non_negative,
    check_positive,
    data_spec,
    device_spec,
    estimator_layer,
    estimator_settings,
    estimator_spec,
    fast_path,
    finish_attack_args,
    finish_estimator_args,
    finish_release_args,
    normalization,
    number,
    sgd_spec,
    train_attack,
    training_run,
    warn_without_adversarial_epoch,
)
from utils.mi.estimators import (
    build_estimators,
    build_one_estimator,
    check_stage2_config,
    load_estimators,
    load_standard_estimator,
)
from utils.namid import freeze, namid_objective, wmim_objective
from utils.script import run_main
from utils.training.balance import BALANCE_LIMIT, BalanceMonitor
from utils.training.loop import fit_target
from utils.training.losses import ADV_LOSSES, ATTACK_FOR_LOSS
from utils.training.setup import fresh_model, setup, sgd


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--method", default="namid", choices=("namid", "wmim"),
                   help="namid: the paper's defense; wmim: AT plus maximising Î(x̃; h(x̃)) (baseline)")
    p.add_argument("--adv-loss", default="ce", choices=ADV_LOSSES,
                   help="L_adv: ce (NAMID), trades (NAMID-T), mart (NAMID-M)")
    p.add_argument("--beta", type=number, default=6.0, help="TRADES / MART trade-off β")
    p.add_argument("--alpha", type=number, default=5.0, help="weight α of the MI loss (Eq. 9)")
    p.add_argument("--lam", type=number, default=None,
                   help="weight λ of the MI-gap term (Eq. 8); 0 is ablation (iii) (default: 0.1)")
    p.add_argument("--no-adv-mi", action="store_true", help="drop the adversarial-MI terms: ablation (i)")
    p.add_argument("--no-nat-mi", action="store_true", help="drop the natural-MI terms: ablation (ii)")
    p.add_argument("--release-loss", action="store_true",
                   help="the release's loss: L_adv + α·(the two cosine terms), no λ term")
    p.add_argument("--mi-dir", default=None,
                   help="folder with the stage-2 files (NAMID: local/global_{n,a}_model.pth; "
                        "WMIM: local/global_std_model.pth)")
    for flag, what in (("--pre-local-n", "local net of E_n"), ("--pre-global-n", "global net of E_n"),
                       ("--pre-local-a", "local net of E_a"), ("--pre-global-a", "global net of E_a")):
        p.add_argument(flag, default=None, help=f"the {what} (the release's flag; overrides --mi-dir)")
    add_estimator_args(p)
    add_release_args(p)
    # The paper's PGD-10 with step ε/4; the release's stage 3 used 40 steps of 0.007.
    add_attack_args(p)
    add_optim_args(p)
    add_speed_args(p)
    add_run_args(p, model_dir="checkpoints/namid")
    p.add_argument("--select-by", default="mean_acc", choices=("pgd_acc", "mean_acc"),
                   help="metric that picks target_model.pth: (clean + PGD)/2 as the release, or PGD accuracy")
    p.add_argument("--balance-batches", type=int, default=8,
                   help="batches per adversarial epoch on which ‖∇θ α·L_mi‖ / ‖∇θ L_adv‖ and the gradients' cosine "
                        "are measured, spread over the epoch (0: none)")
    p.add_argument("--balance-limit", type=number, default=BALANCE_LIMIT,
                   help="warn when an epoch's median ‖∇θ α·L_mi‖ / ‖∇θ L_adv‖ exceeds this (README: the α balance)")
    p.add_argument("--mi-grad-clip", type=number, default=None, metavar="RHO",
                   help="scale the MI gradient to at most RHO·‖∇θ L_adv‖ on every step (MINE's adaptive gradient "
                        "clipping; not in the paper or the release; default: off)")
    p.add_argument("--no-collapse-guard", action="store_true",
                   help="train on when the held-out clean accuracy falls to chance in an adversarial epoch")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    finish_attack_args(p, args)
    finish_estimator_args(p, args)
    given = [f"--release-{q}" for q in ("selection", "passes") if getattr(args, f"release_{q}")]
    finish_release_args(args)
    check_positive(p, args, "epochs", "batch_size", "lr", "lr_gamma")
    check_non_negative(p, args, "alpha", "lam", "beta", "momentum", "weight_decay", "warm_up_epochs",
                       "epsilon_ramp_epochs", "save_freq", "val_size", "balance_limit",
                       "balance_batches")
    check_positive(p, args, "mi_grad_clip")
    warn_without_adversarial_epoch(args)
    if args.no_adv_mi and args.no_nat_mi:
        p.error("--no-adv-mi and --no-nat-mi together leave no MI term; train with train_standard.py instead")
    explicit = [args.pre_local_n, args.pre_global_n, args.pre_local_a, args.pre_global_a]
    # A flag that the chosen loss ignores would silently train something else than asked for.
    if args.method == "wmim":
        namid_only = {"--lam": args.lam is not None, "--no-adv-mi": args.no_adv_mi, "--no-nat-mi": args.no_nat_mi,
                      "--release-loss": args.release_loss, "--pre-local-n/...": any(explicit),
                      **{flag: True for flag in given}}
        ignored = [flag for flag, given in namid_only.items() if given]
        if ignored:
            p.error(f"{', '.join(ignored)} only apply to --method namid")
        if args.mi_dir is None:
            p.error("--method wmim needs --mi-dir: the folder of train_MI_estimator_only_max.py")
    if args.release_loss and args.lam is not None:
        p.error("--release-loss has no λ term; drop --lam")
    args.lam = 0.1 if args.lam is None else args.lam
    if args.mi_dir is None and not all(explicit):
        p.error("the estimators are missing: pass --mi-dir or all four of --pre-local-n/--pre-global-n/"
                "--pre-local-a/--pre-global-a")
    return args


def namid_kwargs(args) -> dict:
    """The keyword arguments of ``utils.namid.namid_objective`` that the flags set."""
    return dict(alpha=args.alpha, lam=args.lam, adv_loss=args.adv_loss, beta=args.beta, mode=args.va_mode,
                layer=estimator_layer(args), use_nat=not args.no_nat_mi, use_adv=not args.no_adv_mi,
                release_loss=args.release_loss, quirks=args.quirks)


def wmim_kwargs(args) -> dict:
    """The keyword arguments of ``utils.namid.wmim_objective`` that the flags set."""
    return dict(alpha=args.alpha, adv_loss=args.adv_loss, beta=args.beta, mode=args.va_mode,
                layer=estimator_layer(args), quirks=args.quirks)


def main(argv=None):
    args = parse_args(argv)
    if args.mi_dir is not None:
        check_stage2_config(estimator_settings(args), args.mi_dir)
    s = setup(args.model_dir, data_spec(args), device_spec(args))
    fast = fast_path(args)
    model = fresh_model(args.arch, s.info, s.device, fast, normalization(args))
    spec = estimator_spec(args, s.info)
    net = bare_module(model)
    if args.method == "wmim":
        standard = freeze(load_standard_estimator(build_one_estimator(spec, net, s.device), args.mi_dir))
    else:
        estimators = build_estimators(spec, net, s.device)
        load_estimators(estimators, args.mi_dir, {
            ("natural", "local"): args.pre_local_n, ("natural", "global"): args.pre_global_n,
            ("adversarial", "local"): args.pre_local_a, ("adversarial", "global"): args.pre_global_a})
        est_n, est_a = (freeze(estimators[k]) for k in ("natural", "adversarial"))
    optimizer, scheduler = sgd(model, sgd_spec(args))
    run = training_run(args, {"model": model}, optimizer, scheduler, s.generator, s.held_out, args.select_by)
    attack_loss, start = ATTACK_FOR_LOSS[args.adv_loss]
    if args.quirks.start:
        start = "normal"
    if args.method == "wmim":
        objective, nets, kwargs = wmim_objective, (standard,), wmim_kwargs(args)
    else:
        objective, nets, kwargs = namid_objective, (est_n, est_a), namid_kwargs(args)
    advice = f"lower --alpha (now {args.alpha:g})" + ("" if args.mi_grad_clip else " or cap the MI gradient with "
                                                       "--mi-grad-clip 1")
    balance = BalanceMonitor(args.balance_batches, args.balance_limit, args.mi_grad_clip,
                             guard=not args.no_collapse_guard, num_classes=s.info.num_classes, advice=advice)

    def adversarial_step(x, y, eps, step_size):
        x_adv = pgd(model, x, y, eps, step_size, args.num_steps, args.distance, attack_loss, start)
        measure = balance.measure_next()
        loss, logits_adv, extra = objective(model, *nets, x, x_adv, y, **kwargs, measure_grads=measure,
                                            mi_grad_clip=args.mi_grad_clip)
        return loss, logits_adv, balance.record(extra) if measure else extra

    first_epoch = run.start()  # 1, or the epoch after last.pth's with --resume
    balance.resume_from(run.records())
    fit_target(run, first_epoch, model, s.train_loader, s.eval_loader, adversarial_step, "target_model.pth",
               train_attack(args), warm_up_epochs=args.warm_up_epochs, ramp_epochs=args.epsilon_ramp_epochs,
               fast=fast, progress=not args.no_progress,
               on_epoch=lambda epoch: balance.start_epoch(len(s.train_loader)),
               after_training=balance.end_training, after_evaluation=balance.end_evaluation)


if __name__ == "__main__":
    run_main(main)
