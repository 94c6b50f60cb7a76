"""Stage 1: adversarially train the target model h_θ0 (PAPER.md §2 and §7).

Standard AT (Madry et al.; ``--loss ce``), TRADES (``--loss trades``) or MART
(``--loss mart``). Writes <model-dir>/best_model.pth, last.pth, config.json, metrics.jsonl."""
import time

import torch

from models import get_model
from utils.attacks.pgd import pgd
from utils.cli import (
    Parser,
    add_attack_args,
    add_data_args,
    add_model_args,
    add_optim_args,
    add_run_args,
    check_non_negative,
    check_positive,
    finish_attack_args,
)
from utils.data import BatchLoader, load_splits
from utils.losses import ADV_LOSSES, ATTACK_FOR_LOSS, adversarial_loss, needs_natural_logits
from utils.training import (
    Run,
    cross_entropy_step,
    epsilon_at,
    evaluate,
    format_metrics,
    resolve_device,
    run_main,
    seed_everything,
    train_epoch,
)


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--loss", default="ce", choices=ADV_LOSSES, help="ce: Standard AT, trades: TRADES, mart: MART")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES / MART trade-off β")
    add_attack_args(p)
    add_optim_args(p)
    add_run_args(p, model_dir="checkpoints/standard")
    p.add_argument("--select-by", default="pgd_acc", choices=("pgd_acc", "mean_acc"),
                   help="metric that picks best_model.pth: PGD accuracy, or (clean + PGD)/2 as the release")
    args = p.parse_args(argv)
    finish_attack_args(p, args)
    check_positive(p, args, "epochs", "batch_size", "lr")
    check_non_negative(p, args, "beta", "weight_decay", "warm_up_epochs", "epsilon_ramp_epochs", "save_freq",
                       "val_size")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    splits, info = load_splits(args.dataset, args.data_dir, train_limit=args.train_limit,
                               test_limit=args.test_limit, val_size=args.val_size, seed=args.seed)
    model = get_model(args.arch, num_classes=info.num_classes, in_channels=info.in_channels).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_milestones, gamma=args.lr_gamma)

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = BatchLoader(splits["train"].to(device), args.batch_size, shuffle=True, augment=True, info=info,
                               device=device, generator=generator)
    eval_split = splits["val"] if splits["val"] is not None else splits["test"]
    eval_loader = BatchLoader(eval_split.to(device), args.batch_size, device=device)

    run = Run(args, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, generator, args.select_by)
    attack_loss, start = ATTACK_FOR_LOSS[args.loss]

    for epoch in range(run.start(), args.epochs + 1):
        began = time.time()
        eps = epsilon_at(epoch, args)
        step_size = args.step_size * eps / args.epsilon

        def adversarial_step(x, y, eps=eps, step_size=step_size):
            x_adv = pgd(model, x, y, eps, step_size, args.num_steps, args.distance, attack_loss, start)
            logits_nat = model(x) if needs_natural_logits(args.loss) else None
            logits_adv = model(x_adv)
            return adversarial_loss(args.loss, logits_adv, y, logits_nat, args.beta), logits_adv, {}

        step = adversarial_step if eps > 0 else cross_entropy_step(model)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_epoch(model, train_loader, step, optimizer, f"epoch {epoch}/{args.epochs}",
                            not args.no_progress)
        scheduler.step()
        stats.update(evaluate(model, eval_loader, args.epsilon, args.step_size, args.eval_steps, args.distance,
                              not args.no_progress))
        stats["mean_acc"] = (stats["clean_acc"] + stats["pgd_acc"]) / 2
        record = run.end_epoch(epoch, {"lr": lr, "train_epsilon": eps, **stats, "seconds": time.time() - began},
                               best={"best_model.pth": model})
        print(format_metrics(record), flush=True)


if __name__ == "__main__":
    run_main(main)
