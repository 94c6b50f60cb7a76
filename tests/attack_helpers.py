"""Models and data shared by the attack tests (tests/test_<attack>.py, tests/test_registry.py)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

N_CLASSES = 10


def tiny_cnn(in_ch=1, classes=3):
    return nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, classes))


def blobs(n=192, classes=3, seed=0):
    """Three classes told apart by which third of an 8×8 image is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 + 0.1 * torch.rand(n, 1, 8, 8, generator=g)
    for c in range(classes):
        rows = slice(c * 8 // classes, (c + 1) * 8 // classes + (1 if c == classes - 1 else 0))
        x[y == c, :, rows, :] += 0.3
    return x.clamp(0, 1), y


def images(n: int, generator: torch.Generator):
    # Smooth class prototypes plus noise: learnable in a few hundred steps, yet close enough
    # for small budgets to flip decisions.
    protos = torch.rand(N_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    protos = F.avg_pool2d(F.pad(protos, (1, 1, 1, 1), mode="replicate"), 3, 1)
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    x = (protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=generator)).clamp(0, 1)
    return x, y


def train_tiny():
    """A tiny MLP (with BatchNorm, so that eval mode matters) trained on synthetic 10-class 1×8×8
    images: (model in eval mode, 32 test images, their labels)."""
    g = torch.Generator().manual_seed(0)
    x_train, y_train = images(2000, g)
    x_test, y_test = images(32, g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, N_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        idx = torch.randint(0, len(x_train), (128,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        clean = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert clean >= 0.8, clean
    return model, x_test, y_test


class Halfspace(nn.Module):
    """Two classes split by a hyperplane at L2 distance ``margin`` from the all-0.5 image."""

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def forward(self, x):
        w = torch.full(x.shape[1:], 1.0 / x[0].numel() ** 0.5)  # unit normal
        f = ((x - 0.5) * w).flatten(1).sum(1) + self.margin
        return torch.stack([f, -f], dim=1)
