"""The release's per-step work, rebuilt for timing only: the baseline of ``benchmark.py``.

Written from PAPER.md (§5–§7, §9) and from reading the authors' release (dwDavidxd/MIAT:
``utils/standard_loss.py``, ``train_MIAT.py``); no code is taken from it. It uses the same
models, estimators, MI bounds and losses as our scripts, on the same batch with the same PGD
budget, so that a ratio of the two measures only what the release did differently:

- data: numpy uint8 NHWC arrays -> a ``Dataset`` of PIL images through torchvision's
  RandomCrop(pad 4) + RandomHorizontalFlip + ToTensor -> a ``DataLoader`` -> ``.to(device)``
  per batch (ours: uint8 tensors on the device, cropped and flipped as batched tensor ops);
- attack: the release's L∞ loop, which is as lean as ours: eval mode, a 0.001·N(0, I) start,
  ``torch.autograd.grad`` with respect to the input only, a sign step, projection and clamp
  (only the release's L2 branch, not timed here, back-propagated into the parameters);
- forwards: a separate target forward for every use of h(x) or h(x̃) (see
  :func:`namid_step`: seven per stage-3 step; ours: two), and each MI term encodes its
  pattern with the local net again (ours: once per pattern);
- precision: fp32 always.

Left out on purpose, although the release may have done them too (each would make the
reference slower): back-propagation from the stage-2 losses into the frozen target,
parameter gradients of the frozen estimators in stage 3, the softmax over the batch (§9:
its cost is negligible and its result wrong), and the 40-step stage-3 attack (§7).
"""
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from utils.mi.bounds import mi_per_sample
from utils.mi.objectives import estimator_loss_release
from utils.mi.patterns import select_samples
from utils.namid import namid_loss
from utils.training.losses import adversarial_loss

Tensor = torch.Tensor

# The target forwards of one release stage-3 step, in order (PAPER.md §6); `namid_step` runs exactly these.
NAMID_PASSES = (
    "h(x̃) for L_adv",
    "h(x) for the selection of W",
    "h(x̃) for the selection of W",
    "h(x) for E_n's global net: Î_n(x, h(x))",
    "h(x̃) for E_n's global net: Î_n(x, h(x̃))",
    "h(x) for E_a's global net: Î_a(n, h(x))",
    "h(x̃) for E_a's global net: Î_a(n, h(x̃))",
)
# Stage 2 (PAPER.md §5): the same minus the L_adv pass, all without gradient (the target is frozen).
ESTIMATOR_PASSES = NAMID_PASSES[1:]


# --------------------------------------------------------------------------- data path

class ReleaseImages(Dataset):
    """uint8 NHWC arrays served one PIL image at a time through a torchvision transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return self.transform(image), int(self.labels[i])


def release_loader(images: Tensor, labels: Tensor, batch_size: int, workers: int = 4, seed: int = 0,
                   pin_memory: bool = False) -> DataLoader:
    """The release's training loader for uint8 (N, C, H, W) ``images``: shuffled, augmented per image."""
    from torchvision import transforms

    size = images.shape[-1]
    transform = transforms.Compose([
        transforms.RandomCrop(size, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    dataset = ReleaseImages(nhwc, labels.numpy(), transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attack

def release_pgd(model: nn.Module, x: Tensor, y: Tensor, epsilon: float, step_size: float, num_steps: int) -> Tensor:
    """L∞ PGD as the release's stages ran it: eval mode, x + 0.001·N(0, I), then per step the
    input gradient of CE alone, a sign step, projection onto the ε-ball and [0, 1]."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(num_steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0.0, 1.0)
    return x_adv.detach()


def _mi(estimator, pattern: Tensor, global_input: Tensor, mode: str) -> Tensor:
    # The release's compute_loss: each call encodes its pattern with the local net again.
    return mi_per_sample(estimator.local(pattern), estimator.global_(global_input), mode)


# --------------------------------------------------------------------------- the three steps

def train_step(model: nn.Module, optimizer, x: Tensor, y: Tensor, cfg) -> Tensor:
    """Stage 1 (Standard AT / TRADES): attack, then h(x̃) (and h(x) for TRADES/MART) in train mode."""
    x_adv = release_pgd(model, x, y, cfg.epsilon, cfg.step_size, cfg.num_steps)
    model.train()
    logits_nat = model(x) if cfg.adv_loss != "ce" else None
    loss = adversarial_loss(cfg.adv_loss, model(x_adv), y, logits_nat, cfg.beta)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def estimator_step(target: nn.Module, est_n, est_a, optimizers: Tuple, x: Tensor, y: Tensor, cfg) -> Tensor:
    """Stage 2: attack the frozen target, six separate target forwards (ESTIMATOR_PASSES), and the
    release's losses (PAPER.md §5) with one Adam per estimator; each local net runs twice."""
    target.eval()
    x_adv = release_pgd(target, x, y, cfg.epsilon, cfg.step_size, cfg.num_steps)
    with torch.no_grad():
        sel = select_samples(target(x), target(x_adv), y)
    n = x_adv - x
    with torch.no_grad():
        g_n_nat = target(x)
    mi_n_nat = _mi(est_n, x, g_n_nat, cfg.va_mode)
    with torch.no_grad():
        g_n_adv = target(x_adv)
    mi_n_adv = _mi(est_n, x, g_n_adv, cfg.va_mode)
    with torch.no_grad():
        g_a_nat = target(x)
    mi_a_nat = _mi(est_a, n, g_a_nat, cfg.va_mode)
    with torch.no_grad():
        g_a_adv = target(x_adv)
    mi_a_adv = _mi(est_a, n, g_a_adv, cfg.va_mode)
    loss_n, loss_a = estimator_loss_release(mi_n_nat, mi_n_adv, mi_a_nat, mi_a_adv, sel)
    for optimizer in optimizers:
        optimizer.zero_grad()
    (loss_n + loss_a).backward()
    for optimizer in optimizers:
        optimizer.step()
    return (loss_n + loss_a).detach()


def namid_step(model: nn.Module, est_n, est_a, optimizer, x: Tensor, y: Tensor, cfg) -> Tensor:
    """Stage 3: attack, then the seven train-mode target forwards of NAMID_PASSES, in that order.

    The selection passes keep their (unused) autograd graphs, as a forward outside ``no_grad``
    does; the four MI passes and the L_adv pass are back-propagated. The frozen estimators'
    local nets run once per MI term (four times). Loss: L_adv + α·L_mi, as ours."""
    x_adv = release_pgd(model, x, y, cfg.epsilon, cfg.step_size, cfg.num_steps)
    model.train()
    logits_adv = model(x_adv)                                            # 1
    logits_nat = model(x) if cfg.adv_loss != "ce" else None              # (TRADES/MART only: an eighth)
    l_adv = adversarial_loss(cfg.adv_loss, logits_adv, y, logits_nat, cfg.beta)
    wrong = select_samples(model(x), model(x_adv), y).wrong              # 2, 3
    n = x_adv - x
    mi_n_nat = _mi(est_n, x, model(x), cfg.va_mode)                      # 4
    mi_n_adv = _mi(est_n, x, model(x_adv), cfg.va_mode)                  # 5
    mi_a_nat = _mi(est_a, n, model(x), cfg.va_mode)                      # 6
    mi_a_adv = _mi(est_a, n, model(x_adv), cfg.va_mode)                  # 7
    l_mi, _ = namid_loss(mi_n_nat, mi_n_adv, mi_a_nat, mi_a_adv, wrong, lam=cfg.lam)
    loss = l_adv + cfg.alpha * l_mi
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
