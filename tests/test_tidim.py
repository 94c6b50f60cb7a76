"""TI-DIM and MI-FGSM (utils/attacks/tidim.py)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attacks import tidim as tidim_module
from utils.attacks.registry import build_attack
from utils.attacks.tidim import diverse_input, gaussian_kernel, mifgsm, smooth_gradient, tidim
from utils.host_syncs import HostSyncs


def test_tidim_pieces():
    kernel = gaussian_kernel(15, 3.0)
    assert kernel.shape == (15, 15) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert torch.equal(kernel, kernel.flip(0)) and torch.equal(kernel, kernel.T)
    assert kernel[7, 7] == kernel.max()
    grad = torch.zeros(1, 3, 8, 8)
    grad[0, 1, 4, 4] = 1.0
    smooth = smooth_gradient(grad, gaussian_kernel(5, 1.0))
    assert smooth.shape == grad.shape and smooth[0, 0].abs().sum() == 0 and smooth[0, 2].abs().sum() == 0
    assert torch.isclose(smooth.sum(), torch.tensor(1.0))

    x = torch.rand(4, 3, 8, 8)
    assert diverse_input(x, resize_max=8) is x  # the release's 32 → 32: no transformation
    g = torch.Generator().manual_seed(0)
    out = diverse_input(x, resize_max=12, probability=1.0, generator=g)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert diverse_input(x, resize_max=12, probability=0.0) is x
    again = diverse_input(x, resize_max=12, probability=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


class _Bowl(nn.Module):
    """Two classes, logits (0, −½‖x − t‖²): the summed CE's input gradient is p₁·(t − x) for
    label 0 and p₀·(x − t) for label 1, so its L1-normalised form is ±(t − x)/‖t − x‖₁, known in
    closed form, and it turns as x moves (unlike a linear model's)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, x):
        far = -0.5 * (x - self.target).pow(2).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(far), far], dim=1)


def _bowl(seed: int):
    g = torch.Generator().manual_seed(seed)
    target = 0.3 + 0.4 * torch.rand(3, 8, 8, generator=g)
    x = 0.3 + 0.4 * torch.rand(4, 3, 8, 8, generator=g)  # the steps below never reach the box
    y = torch.tensor([0, 1, 1, 0])
    return _Bowl(target), x, y


def _direction(model, x, y):
    """The sign-relevant CE gradient of the bowl, up to a positive factor per sample (float64)."""
    toward = model.target.double() - x.double()
    return torch.where((y == 0).view(-1, 1, 1, 1), toward, -toward)


def _smooth(grad, size, sigma):
    """Depthwise zero-padded convolution with a normalised size × size Gaussian of width sigma px."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    c = grad.shape[1]
    return F.conv2d(grad, kernel.expand(c, 1, size, size), padding=size // 2, groups=c)


def _l1_normalised(grad):
    return grad / grad.abs().flatten(1).sum(1).view(-1, *[1] * (grad.dim() - 1))


def _assert_sign_step(x_adv, start, step, direction):
    """x_adv = start + step·sign(direction), every coordinate, the direction clear of zero."""
    assert direction.abs().min() > 1e-5 * direction.abs().max()  # float32 rounding is ~1e-7 of it
    assert torch.allclose(x_adv.double(), start.double() + step * direction.sign(), atol=1e-6)


def test_mifgsm_steps_along_the_momentum_of_l1_normalised_gradients():
    """MI-FGSM: step 1 is ε/T·sign(g₁), step 2 ε/T·sign(μ·g₁/‖g₁‖₁ + g₂/‖g₂‖₁), μ = 1."""
    model, x, y = _bowl(seed=0)
    epsilon, steps = 0.1, 2
    step = epsilon / steps  # MI-FGSM's default step
    g1 = _direction(model, x, y)
    one = mifgsm(model, x, y, epsilon, steps=1, step_size=step)
    _assert_sign_step(one, x, step, g1)

    g2 = _direction(model, one, y)
    momentum = 1.0 * _l1_normalised(g1) + _l1_normalised(g2)
    # The setting tells the rules apart: without the momentum, or without the normalisation,
    # some coordinates would step the other way.
    assert (momentum.sign() != g2.sign()).any()
    assert (momentum.sign() != (g1 + g2).sign()).any()
    two = mifgsm(model, x, y, epsilon, steps=steps)
    _assert_sign_step(two, one, step, momentum)
    assert (two - x).abs().max() <= epsilon + 1e-6


def test_tidim_steps_along_the_smoothed_gradient_with_momentum():
    """TI-DIM with DI off (resize_max = H): each gradient is smoothed per channel, then
    normalised and accumulated, so step 1 is α·sign(K ∗ g₁) and step 2 α·sign(μ·m₁ + ĝ₂)."""
    model, x, y = _bowl(seed=1)
    step, decay, size, sigma = 0.03, 0.5, 5, 1.0
    options = dict(step_size=step, decay=decay, kernel_size=size, sigma=sigma, resize_max=8)
    g1 = _smooth(_direction(model, x, y), size, sigma)
    assert (g1.sign() != _direction(model, x, y).sign()).any()  # the smoothing matters here
    one = tidim(model, x, y, 0.1, steps=1, **options)
    _assert_sign_step(one, x, step, g1)

    g2 = _smooth(_direction(model, one, y), size, sigma)
    momentum = decay * _l1_normalised(g1) + _l1_normalised(g2)
    assert (momentum.sign() != g2.sign()).any()
    two = tidim(model, x, y, 0.1, steps=2, **options)
    _assert_sign_step(two, one, step, momentum)


def test_tidim_feeds_every_step_through_diverse_input(monkeypatch):
    """DI transforms the input of every step, with resize_max = round(1.1·H) unless given, and
    what the model reads is DI's output; MI-FGSM has no DI."""
    import utils.attacks.tidim as tidim_module

    calls, fed = [], []

    def spy(x_in, resize_max, probability=0.5, generator=None):
        out = diverse_input(x_in, resize_max, probability, generator)
        calls.append((x_in.detach().clone(), resize_max, probability, out))
        return out

    monkeypatch.setattr(tidim_module, "diverse_input", spy)
    model, x, y = _bowl(seed=2)
    model.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0]))

    build_attack("tidim", epsilon=0.05, steps=3, kernel_size=3)(model, x, y)
    assert [c[1:3] for c in calls] == [(round(1.1 * 8), 0.5)] * 3 == [(9, 0.5)] * 3
    assert torch.equal(calls[0][0], x)  # the first step reads x itself
    assert not torch.equal(calls[1][0], x)  # later ones the current iterate
    assert len(fed) == 3 and all(seen is c[3] for seen, c in zip(fed, calls))

    calls.clear()
    tidim(model, x, y, 0.05, steps=2, resize_max=12, diversity_prob=1.0)
    assert [c[1:3] for c in calls] == [(12, 1.0)] * 2
    calls.clear()
    mifgsm(model, x, y, 0.05, steps=2)
    assert calls == []


def test_tidim_builds_its_kernel_once_per_device_and_dtype(monkeypatch):
    """The TI kernel is made on the inputs' device and dtype once, not copied there at every step,
    and the steps read nothing back to the host (DI off: its draws are host-side)."""
    built, seen = [], []
    real_kernel, real_smooth = tidim_module.gaussian_kernel, tidim_module.smooth_gradient
    monkeypatch.setattr(tidim_module, "gaussian_kernel", lambda *a: built.append(a) or real_kernel(*a))
    monkeypatch.setattr(tidim_module, "smooth_gradient", lambda g, k: seen.append(k) or real_smooth(g, k))
    tidim_module._kernel_on.cache_clear()
    model, x, y = _bowl(3)
    for dtype in (torch.float64, torch.float64, torch.float32):
        with HostSyncs() as syncs:
            tidim(model.to(dtype), x.to(dtype), y, 0.05, steps=3, kernel_size=5, sigma=1.0, resize_max=8)
        assert syncs.total == 0, syncs.calls
    assert built == [(5, 1.0), (5, 1.0)]  # float64, then float32
    assert len(seen) == 9 and all(k is seen[0] for k in seen[:6]) and seen[6] is not seen[0]
    assert seen[0].dtype == torch.float64 and seen[6].dtype == torch.float32
    assert torch.equal(seen[6], real_kernel(5, 1.0))
