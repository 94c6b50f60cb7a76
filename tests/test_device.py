"""utils/training/device.py: the device flag, seeding, and RNG state that a resume restores."""
import random

import numpy as np
import pytest
import torch

import utils.training.device
from utils.script import UserError
from utils.training.device import prepare_device, resolve_device, rng_state, seed_everything, set_rng_state


def test_rng_state_round_trip_replays_every_stream():
    seed_everything(4)
    gen = torch.Generator().manual_seed(9)
    state = rng_state(gen)
    first = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=gen))
    set_rng_state(state, gen)
    again = (torch.rand(3), random.random(), np.random.rand(2), torch.rand(2, generator=gen))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_device_flag():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            resolve_device("cuda")


@pytest.fixture
def matmul_precision():
    """Restores PyTorch's matmul precision (and cudnn.benchmark) after the test."""
    before, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(before)
    torch.backends.cudnn.benchmark = benchmark


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_reaches_the_matmul_setting_on_cuda(monkeypatch, matmul_precision, tf32):
    # A CUDA device as far as prepare_device can tell: the setting is a flag, no GPU is needed to set it.
    monkeypatch.setattr(utils.training.device, "resolve_device", lambda name: torch.device("cuda", 0))
    torch.set_float32_matmul_precision("high" if not tf32 else "highest")  # the opposite, so that it must change
    assert prepare_device("auto", 8, tf32=tf32).type == "cuda"
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32  # convolutions: PyTorch's default, left alone


def test_tf32_leaves_a_cpu_run_in_full_fp32(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    assert prepare_device("cpu", 8, tf32=True).type == "cpu"
    assert torch.get_float32_matmul_precision() == "highest"
