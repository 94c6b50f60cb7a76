import pytest
import torch

from models.estimator import (
    GlobalEncoder,
    LocalEncoder,
    MIEstimator,
    ResidualBlock1x1,
    build_estimator,
)


@pytest.mark.parametrize(
    "shape, out_hw",
    [((1, 28, 28), (7, 7)), ((3, 32, 32), (8, 8)), ((3, 64, 64), (16, 16))],
)
def test_local_encoder_shapes(shape, out_hw):
    net = LocalEncoder(shape[0], hidden=32)
    assert net(torch.rand(2, *shape)).shape == (2, 32, *out_hw)


def test_default_hidden_is_2048():
    net = LocalEncoder(3)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 2048, 8, 8)
    assert GlobalEncoder(10)(torch.randn(2, 10)).shape == (2, 2048, 1, 1)


@pytest.mark.parametrize("classes", [10, 200])
def test_global_encoder_on_logits(classes):
    net = GlobalEncoder(classes, hidden=64)
    logits = torch.randn(3, classes)
    out = net(logits)
    assert out.shape == (3, 64, 1, 1)
    torch.testing.assert_close(net(logits[:, :, None, None]), out)


@pytest.mark.parametrize(
    "internal, feature_shape", [("layer3", (256, 8, 8)), ("layer4", (512, 4, 4)), ("layer3", (64, 7, 7))]
)
def test_global_encoder_internal(internal, feature_shape):
    net = GlobalEncoder(feature_shape[0], hidden=32, internal=internal, feature_shape=feature_shape)
    feats = torch.randn(8, *feature_shape, requires_grad=True)
    out = net(feats)
    assert out.shape == (8, 32, 1, 1)
    # LayerNorm outputs sum to zero over channels (and BatchNorm over two 1×1 samples is ±1):
    # a batch of 8 and a random weighting keep the gradient from vanishing identically.
    (out * torch.randn_like(out)).sum().backward()
    # Stage 3 trains the target through the global net.
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_global_encoder_non_square_map_is_pooled():
    net = GlobalEncoder(16, hidden=8, internal="layer4", feature_shape=(16, 8, 4))
    assert net(torch.randn(2, 16, 8, 4)).shape == (2, 8, 1, 1)


def test_global_encoder_bad_arguments():
    with pytest.raises(ValueError):
        GlobalEncoder(256, internal="layer2", feature_shape=(256, 8, 8))
    with pytest.raises(ValueError):
        GlobalEncoder(256, internal="layer3")
    with pytest.raises(ValueError):
        GlobalEncoder(128, internal="layer3", feature_shape=(256, 8, 8))


@pytest.mark.parametrize("in_ch, hidden", [(10, 32), (128, 128)])
def test_shortcut_initialised_near_identity(in_ch, hidden):
    w = ResidualBlock1x1(in_ch, hidden).shortcut.weight[:, :, 0, 0]
    assert torch.equal(torch.diagonal(w), torch.ones(in_ch))
    off = w.clone()
    off[torch.arange(in_ch), torch.arange(in_ch)] = 0
    assert off.abs().max() <= 0.01


def test_shortcut_keeps_default_init_when_wider_than_hidden():
    """PAPER.md §3: the identity initialisation applies only where c ≤ H."""
    torch.manual_seed(0)
    w = ResidualBlock1x1(40, 16).shortcut.weight[:, :, 0, 0]
    assert w.abs().max() > 0.05  # PyTorch's default bound is 1/sqrt(40) ≈ 0.16, not 0.01
    assert not torch.equal(torch.diagonal(w), torch.ones(16))


def test_block_output_is_layer_normed_over_channels():
    block = ResidualBlock1x1(12, 48)
    out = block(torch.randn(4, 12, 3, 5) * 7 + 2)
    mean, var = out.mean(dim=1), out.var(dim=1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


def test_local_input_is_detached():
    net = LocalEncoder(3, hidden=16)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is None
    assert all(p.grad is not None for p in net.parameters())


def test_build_estimator_and_mi():
    est = build_estimator(3, 10, hidden=32)
    assert isinstance(est, MIEstimator)
    x = torch.rand(5, 3, 32, 32)
    logits = torch.randn(5, 10, requires_grad=True)
    for mode in ("dv", "jsd", "nce"):
        mi = est.mi(x, logits, mode)
        assert mi.shape == (5,) and torch.isfinite(mi).all()
    est(x, logits).mean().backward()
    assert logits.grad is not None

    internal = build_estimator(3, 10, hidden=32, internal="layer4", feature_shape=(512, 4, 4))
    assert internal.mi(x, torch.randn(5, 512, 4, 4)).shape == (5,)
