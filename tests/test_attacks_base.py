"""The norm geometry and the attack mode shared by every attack (utils/attacks/base.py)."""
import pytest
import torch

from tests.attack_helpers import tiny_cnn
from utils.attacks.base import attack_mode, draw, lp_norm, project, random_start


def test_projection_and_random_start_geometry():
    torch.manual_seed(0)
    d = torch.randn(64, 3, 4, 4)
    assert lp_norm(project(d, 0.5, "l2"), "l2").max() <= 0.5 + 1e-6
    small = 0.01 * d
    assert torch.allclose(project(small, 10.0, "l2"), small)  # inside: unchanged
    assert project(d, 0.1, "linf").abs().max() <= 0.1
    x = torch.rand(256, 3, 4, 4)
    r2 = random_start(x, 0.5, "l2")
    assert lp_norm(r2, "l2").max() <= 0.5 + 1e-6
    ri = random_start(x, 0.1, "linf")
    assert ri.abs().max() <= 0.1 and ri.abs().max() > 0.09


def test_attack_mode_restores_after_exception():
    model = tiny_cnn()
    model.train()
    with pytest.raises(RuntimeError):
        with attack_mode(model):
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_draw_takes_its_numbers_from_the_generator_and_its_dtype_from_the_input():
    like = torch.zeros(2, dtype=torch.float64)
    got = draw(torch.randn, (4, 3), like, torch.Generator().manual_seed(5))
    assert got.dtype == torch.float64 and got.device == like.device
    assert torch.equal(got, torch.randn((4, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    torch.manual_seed(5)
    assert torch.equal(draw(torch.rand, (3,), like), torch.rand(3, generator=torch.Generator().manual_seed(5),
                                                                  dtype=torch.float64))
