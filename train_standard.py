"""Stage 1: adversarially train the target model h_θ0 (PAPER.md §2 and §7).

Standard AT (Madry et al.; ``--loss ce``), TRADES (``--loss trades``) or MART
(``--loss mart``). Writes <model-dir>/best_model.pth, last.pth, config.json, metrics.jsonl, curves.png."""


from utils.attacks.pgd import pgd
from utils.cli import (
    Parser,
    add_attack_args,
    add_data_args,
    add_model_args,
    add_optim_args,
    add_run_args,
    add_speed_args,
    check_non_negative,
    check_positive,
    data_spec,
    device_spec,
    fast_path,
    finish_attack_args,
    normalization,
    number,
    sgd_spec,
    train_attack,
    training_run,
    warn_without_adversarial_epoch,
)
from utils.script import run_main
from utils.training.loop import fit_target
from utils.training.losses import ADV_LOSSES, ATTACK_FOR_LOSS, adversarial_loss, needs_natural_logits
from utils.training.setup import fresh_model, setup, sgd


def build_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--loss", default="ce", choices=ADV_LOSSES, help="ce: Standard AT, trades: TRADES, mart: MART")
    p.add_argument("--beta", type=number, default=6.0, help="TRADES / MART trade-off β")
    add_attack_args(p)
    add_optim_args(p)
    add_speed_args(p)
    add_run_args(p, model_dir="checkpoints/standard")
    p.add_argument("--select-by", default="pgd_acc", choices=("pgd_acc", "mean_acc"),
                   help="metric that picks best_model.pth: PGD accuracy, or (clean + PGD)/2 as the release")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    finish_attack_args(p, args)
    check_positive(p, args, "epochs", "batch_size", "lr", "lr_gamma")
    check_non_negative(p, args, "beta", "momentum", "weight_decay", "warm_up_epochs", "epsilon_ramp_epochs",
                       "save_freq", "val_size")
    warn_without_adversarial_epoch(args)
    return args


def standard_objective(model, x, x_adv, y, args):
    """L_adv for one batch in train mode: x̃ goes through the model once, x only for TRADES/MART."""
    logits_nat = model(x) if needs_natural_logits(args.loss) else None
    logits_adv = model(x_adv)
    return adversarial_loss(args.loss, logits_adv, y, logits_nat, args.beta), logits_adv, {}


def main(argv=None):
    args = parse_args(argv)
    s = setup(args.model_dir, data_spec(args), device_spec(args))
    fast = fast_path(args)
    model = fresh_model(args.arch, s.info, s.device, fast, normalization(args))
    optimizer, scheduler = sgd(model, sgd_spec(args))
    run = training_run(args, {"model": model}, optimizer, scheduler, s.generator, s.held_out, args.select_by)
    attack_loss, start = ATTACK_FOR_LOSS[args.loss]

    def adversarial_step(x, y, eps, step_size):
        x_adv = pgd(model, x, y, eps, step_size, args.num_steps, args.distance, attack_loss, start)
        return standard_objective(model, x, x_adv, y, args)

    first_epoch = run.start()  # 1, or the epoch after last.pth's with --resume
    fit_target(run, first_epoch, model, s.train_loader, s.eval_loader, adversarial_step, "best_model.pth",
               train_attack(args), warm_up_epochs=args.warm_up_epochs, ramp_epochs=args.epsilon_ramp_epochs,
               fast=fast, progress=not args.no_progress)


if __name__ == "__main__":
    run_main(main)
