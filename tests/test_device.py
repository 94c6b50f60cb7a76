"""utils/device.py: the device flag, seeding, and RNG state that a resume restores."""
import random

import numpy as np
import pytest
import torch

from utils.device import resolve_device, rng_state, seed_everything, set_rng_state
from utils.script import UserError


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
