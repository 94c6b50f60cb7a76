"""Shapes, the shared feature interface and the registry of models/."""


import pytest
import torch

from models import MODEL_NAMES, feature_shapes, get_model
from utils.mi.estimators import EstimatorSpec, build_one_estimator, internal_layer, target_outputs

# (input shape, num_classes) of MNIST-like, CIFAR-10, CIFAR-100 and Tiny-ImageNet data.
DATASETS = [((1, 28, 28), 10), ((3, 32, 32), 10), ((3, 32, 32), 100), ((3, 64, 64), 200)]
# WRN-34-10 and ResNet-50 are slow on CPU: one 32x32 forward each (see test_big_models).
SMALL = [n for n in MODEL_NAMES if n not in ("wrn-34-10", "resnet50")]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("shape,num_classes", DATASETS)
def test_output_shapes(name, shape, num_classes):
    model = get_model(name, num_classes=num_classes, in_channels=shape[0]).eval()
    with torch.no_grad():
        logits, feats = model(torch.rand(2, *shape), return_features=True)
    assert logits.shape == (2, num_classes)
    assert set(feats) == {"layer3", "layer4"}
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats.values())


@pytest.mark.parametrize(
    "name,layer3,layer4", [("wrn-34-10", (320, 16, 16), (640, 8, 8)), ("resnet50", (1024, 8, 8), (2048, 4, 4))]
)
def test_big_models(name, layer3, layer4):
    model = get_model(name, num_classes=10).eval()
    calls = _count_calls(model)
    with torch.no_grad():
        logits, feats = model(torch.rand(2, 3, 32, 32), return_features=True)
    assert logits.shape == (2, 10)
    assert tuple(feats["layer3"].shape[1:]) == layer3
    assert tuple(feats["layer4"].shape[1:]) == layer4
    assert set(calls.values()) == {1}


def test_resnet18_features_match_plain_forward():
    model = get_model("resnet18").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        plain = model(x)
    assert feats["layer3"].shape == (2, 256, 8, 8)
    assert feats["layer4"].shape == (2, 512, 4, 4)
    assert torch.equal(logits, plain)


def _count_calls(model):
    calls = {}

    def hook(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1

    for m in model.modules():
        if not isinstance(m, torch.nn.ModuleList):  # containers that are never called
            m.register_forward_hook(hook)
            calls[m] = 0
    return calls


@pytest.mark.parametrize("name", SMALL)
def test_return_features_is_one_pass(name):
    model = get_model(name)
    calls = _count_calls(model)
    model(torch.rand(2, 3, 32, 32), return_features=True)
    # Every module ran exactly once: no second pass to get the features.
    assert set(calls.values()) == {1}


@pytest.mark.parametrize("name,first_conv", [("smallcnn", "block1.0"), ("resnet20", "conv1")])
@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_features_carry_gradient(name, first_conv, layer):
    model = get_model(name, in_channels=1)
    logits, feats = model(torch.rand(2, 1, 28, 28), return_features=True)
    feats[layer].sum().backward()
    assert model.get_submodule(first_conv).weight.grad.abs().sum() > 0


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown architecture 'foo'") as err:
        get_model("foo")
    for name in MODEL_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "name,frozen,expected",
    [
        ("resnet18", "layer1", {"layer3": (256, 8, 8), "layer4": (512, 4, 4), "logits": (10,)}),
        ("resnet20", "stage1", {"layer3": (32, 16, 16), "layer4": (64, 8, 8), "logits": (10,)}),
    ],
)
def test_feature_shapes_restores_modes(name, frozen, expected):
    model = get_model(name).train()
    model.get_submodule(frozen).eval()  # a partly frozen model must come back exactly as it was
    before = {n: m.training for n, m in model.named_modules()}
    stats = model.bn1.running_mean.clone()
    shapes = feature_shapes(model, (3, 32, 32))
    assert shapes == expected
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.equal(model.bn1.running_mean, stats)


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("smallcnn", (1, 28, 28), {"layer3": (32, 12, 12), "layer4": (64, 4, 4), "logits": (10,)}),
        ("smallcnn-nobn", (3, 32, 32), {"layer3": (32, 14, 14), "layer4": (64, 5, 5), "logits": (10,)}),
        ("vgg19", (3, 32, 32), {"layer3": (512, 4, 4), "layer4": (512, 2, 2), "logits": (10,)}),
        ("vgg19", (1, 28, 28), {"layer3": (512, 4, 4), "layer4": (512, 2, 2), "logits": (10,)}),
        ("resnet18", (3, 64, 64), {"layer3": (256, 16, 16), "layer4": (512, 8, 8), "logits": (10,)}),
        ("resnet20", (1, 28, 28), {"layer3": (32, 14, 14), "layer4": (64, 7, 7), "logits": (10,)}),
        ("resnet20", (3, 32, 32), {"layer3": (32, 16, 16), "layer4": (64, 8, 8), "logits": (10,)}),
    ],
)
def test_feature_shapes(name, shape, expected):
    assert feature_shapes(get_model(name, in_channels=shape[0]), shape) == expected


def test_smallcnn_variants():
    with_bn = get_model("smallcnn", in_channels=1)
    without = get_model("smallcnn-nobn", in_channels=1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    # TRADES starts from a zero last layer, so every class scores 0 at initialisation.
    assert torch.count_nonzero(without(torch.rand(2, 1, 28, 28))) == 0


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("flag", [None, "is_internal", "is_internal_last"])
def test_resnet20_feeds_the_estimators(shape, flag):
    """Stages 2 and 3 size the global net from feature_shapes and feed it target_outputs."""
    model = get_model("resnet20", 10, shape[0]).eval()
    layer = internal_layer(flag == "is_internal", flag == "is_internal_last")
    spec = EstimatorSpec(16, layer, in_channels=shape[0], num_classes=10, image_size=shape[1])
    estimator = build_one_estimator(spec, model, torch.device("cpu"))
    x = torch.rand(4, *shape)
    logits, read = target_outputs(model, x, layer)
    assert logits.shape == (4, 10)
    expected = {None: (10,), "is_internal": (32,), "is_internal_last": (64,)}[flag]
    assert read.shape[1] == expected[0]
    assert estimator.global_(read).shape == (4, 16, 1, 1)
    mi = estimator.mi(x, read)
    assert mi.shape == (4,) and torch.isfinite(mi).all()
    mi.sum().backward()  # stage 3 trains the target through the global net
    assert model.conv1.weight.grad.abs().sum() > 0


def test_resnet20_batchnorm_modes():
    """Train mode normalises by the batch and updates the running stats; eval mode uses them,
    so a sample's logits no longer depend on the rest of its batch."""
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 1)
    x = torch.rand(8, 1, 28, 28)
    stats = model.bn1.running_mean.clone()
    with torch.no_grad():
        model.train()
        train_full, train_half = model(x), model(x[:4])
        assert not torch.equal(model.bn1.running_mean, stats)
        stats = model.bn1.running_mean.clone()
        model.eval()
        eval_full, eval_half = model(x), model(x[:4])
    assert torch.equal(model.bn1.running_mean, stats)
    torch.testing.assert_close(eval_half, eval_full[:4], rtol=1e-4, atol=1e-5)
    assert (train_half - train_full[:4]).abs().max() > 1e-3


# ---------------------------------------------------------------- ResNet stem and parameter counts


@pytest.mark.parametrize("name,width", [("resnet18", 64), ("resnet34", 64), ("resnet50", 64), ("resnet20", 16)])
def test_resnet_stem_is_cifar_style(name, width):
    """PAPER.md §7: the release's ResNet-18 had conv1 padding 0; ours uses the usual 3x3/1/1 stem."""
    model = get_model(name, 10, 3)
    conv1 = model.conv1
    assert isinstance(conv1, torch.nn.Conv2d)
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert (conv1.in_channels, conv1.out_channels) == (3, width)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def _conv(c_in, c_out, k, bias=False):
    return c_in * c_out * k * k + (c_out if bias else 0)


def _bn(c):
    return 2 * c  # weight and bias (running stats are buffers, not parameters)


def _fc(c_in, c_out):
    return c_in * c_out + c_out


def _basic_resnet_params(classes, c_in, widths, blocks):
    """3x3 stem, one stage of ``blocks`` BasicBlocks per width, 1x1 projection where the shape changes."""
    total = _conv(c_in, widths[0], 3) + _bn(widths[0])
    planes_in = widths[0]
    for planes in widths:
        for _ in range(blocks):
            total += _conv(planes_in, planes, 3) + _bn(planes) + _conv(planes, planes, 3) + _bn(planes)
            if planes_in != planes:  # the stride-2 blocks are exactly the width-changing ones
                total += _conv(planes_in, planes, 1) + _bn(planes)
            planes_in = planes
    return total + _fc(widths[-1], classes)


def _resnet18_params(classes, c_in):
    """CIFAR ResNet-18: 4 stages of 2 BasicBlocks, widths 64-512."""
    return _basic_resnet_params(classes, c_in, (64, 128, 256, 512), 2)


def _resnet20_params(classes, c_in):
    """ResNet-20 (He et al. 2016, §4.2): 3 stages of 3 BasicBlocks, widths 16/32/64, projection shortcuts."""
    return _basic_resnet_params(classes, c_in, (16, 32, 64), 3)


def _wrn_34_10_params(classes, c_in):
    """Pre-activation WRN-34-10 (TRADES): 3 groups of 5 blocks, widths 160/320/640, bias-free convs."""
    total = _conv(c_in, 16, 3)
    planes_in = 16
    for width, stride in ((160, 1), (320, 2), (640, 2)):
        for i in range(5):
            s = stride if i == 0 else 1
            total += _bn(planes_in) + _conv(planes_in, width, 3) + _bn(width) + _conv(width, width, 3)
            if s != 1 or planes_in != width:
                total += _conv(planes_in, width, 1)
            planes_in = width
    return total + _bn(640) + _fc(640, classes)


def _vgg19_params(classes, c_in):
    """VGG-19 with BN: 16 3x3 convs (with bias), one linear layer on the pooled 512 features."""
    total, prev = 0, c_in
    for width in [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8:
        total += _conv(prev, width, 3, bias=True) + _bn(width)
        prev = width
    return total + _fc(512, classes)


def _smallcnn_nobn_params(classes, c_in):
    """TRADES SmallCNN: convs 32-32-64-64 (3x3, bias), FC 1024-200-200-classes."""
    convs = _conv(c_in, 32, 3, True) + _conv(32, 32, 3, True) + _conv(32, 64, 3, True) + _conv(64, 64, 3, True)
    return convs + _fc(64 * 4 * 4, 200) + _fc(200, 200) + _fc(200, classes)


@pytest.mark.parametrize(
    "name,in_channels,formula,expected",
    [
        ("resnet18", 3, _resnet18_params, 11_173_962),  # the well-known CIFAR ResNet-18 count
        ("wrn-34-10", 3, _wrn_34_10_params, 46_160_474),  # TRADES' WRN-34-10 (46.16M)
        ("vgg19", 3, _vgg19_params, 20_040_522),
        ("smallcnn-nobn", 1, _smallcnn_nobn_params, 312_202),
        ("resnet20", 3, _resnet20_params, 272_474),
        ("resnet20", 1, _resnet20_params, 272_186),
    ],
)
def test_parameter_counts(name, in_channels, formula, expected):
    assert formula(10, in_channels) == expected  # the pinned number follows from the architecture
    model = get_model(name, 10, in_channels)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_resnet20_is_0_27m_parameters():
    """He et al. 2016, Table 6: 0.27M parameters; the two projections add 2,752 to option A's count."""
    count = sum(p.numel() for p in get_model("resnet20", 10, 3).parameters())
    option_a = count - (_conv(16, 32, 1) + _bn(32) + _conv(32, 64, 1) + _bn(64))
    assert round(count / 1e6, 2) == 0.27 and round(option_a / 1e6, 2) == 0.27


class _RefBasicBlock(torch.nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.a = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.a_bn = torch.nn.BatchNorm2d(c_out)
        self.b = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b_bn = torch.nn.BatchNorm2d(c_out)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = torch.nn.Sequential(
                torch.nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), torch.nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        y = self.b_bn(self.b(torch.relu(self.a_bn(self.a(x)))))
        return torch.relu(y + (x if self.proj is None else self.proj(x)))


class _RefResNet(torch.nn.Module):
    """A hand-written CIFAR ResNet (He et al. 2016, 3x3 stem, no max-pool), for comparison:
    ``blocks`` BasicBlocks per width, the first of each later stage with stride 2."""

    def __init__(self, widths, blocks, c_in=3, classes=10):
        super().__init__()
        self.stem = torch.nn.Conv2d(c_in, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(widths[0])
        spec, prev = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                spec.append((prev, width, 2 if i > 0 and j == 0 else 1))
                prev = width
        self.blocks = torch.nn.ModuleList(_RefBasicBlock(*s) for s in spec)
        self.head = torch.nn.Linear(widths[-1], classes)
        self.blocks_per_stage = blocks

    def forward(self, x):
        out = torch.relu(self.stem_bn(self.stem(x)))
        feats = []
        for block in self.blocks:
            out = block(out)
            feats.append(out)
        # The ends of the last two stages.
        return self.head(out.mean((2, 3))), feats[-1 - self.blocks_per_stage], feats[-1]


@pytest.mark.parametrize(
    "name,widths,blocks,shape",
    [
        ("resnet18", (64, 128, 256, 512), 2, (3, 32, 32)),
        ("resnet20", (16, 32, 64), 3, (3, 32, 32)),
        ("resnet20", (16, 32, 64), 3, (1, 28, 28)),
    ],
)
def test_resnet_matches_hand_written_reference(name, widths, blocks, shape):
    model = get_model(name, 10, shape[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.momentum = 1.0  # running stats = the statistics of the next training batch
        model.train()(torch.rand(8, *shape, generator=g))  # realistic scales for eval mode
    ref = _RefResNet(widths, blocks, shape[0])
    theirs = list(model.state_dict().values())
    keys = list(ref.state_dict().keys())
    assert len(theirs) == len(keys)
    assert [tuple(t.shape) for t in theirs] == [tuple(t.shape) for t in ref.state_dict().values()]
    ref.load_state_dict(dict(zip(keys, theirs)))
    x = torch.rand(2, *shape, generator=g)
    with torch.no_grad():
        logits, feats = model.eval()(x, return_features=True)
        ref_logits, ref3, ref4 = ref.eval()(x)
    assert ref_logits.abs().max() > 1e-3  # not a degenerate comparison
    torch.testing.assert_close(feats["layer3"], ref3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["layer4"], ref4, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
