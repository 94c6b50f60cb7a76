"""Momentum attacks: MI-FGSM (Dong et al., "Boosting Adversarial Attacks with Momentum",
CVPR 2018) and TI-DIM, which adds diverse inputs (Xie et al., "Improving Transferability of
Adversarial Examples with Input Diversity", CVPR 2019) and translation-invariant gradient
smoothing (Dong et al., "Evading Defenses to Transferable Adversarial Examples by
Translation-Invariant Attacks", CVPR 2019). One loop serves both; L∞ only."""
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import attack_mode, unwrap


def gaussian_kernel(size: int = 15, sigma: float = 3.0) -> torch.Tensor:
    """A (size, size) Gaussian summing to 1; ``sigma`` in pixels.

    (TI's own code spans ±3 standard deviations over the kernel, σ = (size − 1)/6 ≈ 2.3 px
    for 15; we take σ as a pixel width, the reading of "15×15, σ = 3".)"""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = g[:, None] * g[None, :]
    return (kernel / kernel.sum()).float()


@functools.lru_cache(maxsize=16)
def _kernel_on(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``gaussian_kernel`` made once per device and dtype (read only): not copied to the device at every step."""
    return gaussian_kernel(size, sigma).to(device=device, dtype=dtype)


def smooth_gradient(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """TI: convolve each channel of the gradient with ``kernel`` (depthwise, same size)."""
    c = grad.shape[1]
    k = kernel.to(grad).expand(c, 1, *kernel.shape)
    pad = (kernel.shape[-2] // 2, kernel.shape[-1] // 2)
    # Zero padding keeps the output size for odd kernels; an even one would grow by a row.
    # fp32 even under autocast: the sign of the smoothed gradient is the step.
    with torch.autocast(device_type=grad.device.type, enabled=False):
        return F.conv2d(grad.float(), k.float(), padding=pad, groups=c)[..., : grad.shape[-2], : grad.shape[-1]]


def diverse_input(
    x: torch.Tensor, resize_max: int, probability: float = 0.5, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """DI: with probability p, resize the batch (nearest) to rnd × rnd with
    rnd ∈ [H, resize_max), zero-pad it to resize_max × resize_max at a random offset, then
    resize (bilinear) back to H × W so that a fixed-size model can read it.

    One draw per call for the whole batch, as in DI's code. ``resize_max <= H`` is the
    identity: that is the release's 32 → 32 setting, under which DI did nothing."""
    h, w = x.shape[-2:]
    if resize_max <= h:
        return x
    device = generator.device if generator is not None else "cpu"

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator, device=device).item())

    if torch.rand((1,), generator=generator, device=device).item() >= probability:
        return x
    rnd = h + draw(resize_max - h)
    rnd_w = round(rnd * w / h)
    max_w = round(resize_max * w / h)
    top, left = draw(resize_max - rnd + 1), draw(max_w - rnd_w + 1)
    small = F.interpolate(x, size=(rnd, rnd_w), mode="nearest")
    padded = F.pad(small, (left, max_w - rnd_w - left, top, resize_max - rnd - top))
    return F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)


def _momentum_loop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    decay: float,
    kernel: Optional[torch.Tensor],
    resize_max: Optional[int],
    diversity_prob: float,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    x = x.detach()
    net = unwrap(model)
    flat = (x.shape[0],) + (1,) * (x.dim() - 1)
    momentum = torch.zeros_like(x)
    x_adv = x.clone()
    with attack_mode(net):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                inputs = x_adv if resize_max is None else diverse_input(x_adv, resize_max, diversity_prob,
                                                                        generator)
                loss = F.cross_entropy(net(inputs).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                if kernel is not None:
                    grad = smooth_gradient(grad, kernel)
                # L1 normalisation makes every step weigh the same in the accumulated direction.
                grad = grad / grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).view(flat)
                momentum = decay * momentum + grad
                x_adv = x_adv.detach() + step_size * momentum.sign()
                x_adv = (x + (x_adv - x).clamp(-epsilon, epsilon)).clamp(0.0, 1.0)
    return x_adv.detach()


def tidim(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    steps: int = 40,
    step_size: float = 0.007,
    decay: float = 0.1,
    kernel_size: int = 15,
    sigma: float = 3.0,
    resize_max: Optional[int] = None,
    diversity_prob: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """TI-DIM within the L∞ ball of radius ε, in [0, 1].

    Defaults are the release's (40 steps of 0.007, momentum μ = 0.1; the paper gives none).
    ``resize_max`` defaults to round(1.1·H), so DI really transforms the input (the
    release's 32 → 32 made it the identity: pass ``resize_max=H`` to reproduce that).
    ``kernel_size=1`` switches TI off."""
    if resize_max is None:
        resize_max = round(1.1 * x.shape[-2])
    kernel = _kernel_on(kernel_size, float(sigma), x.device, x.dtype) if kernel_size > 1 else None
    return _momentum_loop(model, x, y, epsilon, step_size, steps, decay, kernel, resize_max,
                          diversity_prob, generator)


def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    steps: int = 10,
    decay: float = 1.0,
    step_size: Optional[float] = None,
) -> torch.Tensor:
    """MI-FGSM within the L∞ ball of radius ε: μ = 1 and step ε/steps, as in Dong et al."""
    if step_size is None:
        step_size = epsilon / steps
    return _momentum_loop(model, x, y, epsilon, step_size, steps, decay, None, None, 0.0, None)
