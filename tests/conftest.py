import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The tests use tiny tensors: a second OpenMP thread only adds fork/join waits (on a busy
# 2-core machine it made some modules 10-100x slower).
torch.set_num_threads(1)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION = (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
