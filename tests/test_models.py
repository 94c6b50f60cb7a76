"""Shapes, the shared feature interface and the registry of models/."""

import pytest
import torch

from models import MODEL_NAMES, feature_shapes, get_model

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


def test_features_carry_gradient():
    model = get_model("smallcnn", in_channels=1)
    logits, feats = model(torch.rand(2, 1, 28, 28), return_features=True)
    feats["layer4"].sum().backward()
    assert model.block1[0].weight.grad.abs().sum() > 0


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown architecture 'foo'") as err:
        get_model("foo")
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_feature_shapes_restores_modes():
    model = get_model("resnet18").train()
    model.layer1.eval()  # a partly frozen model must come back exactly as it was
    before = {n: m.training for n, m in model.named_modules()}
    stats = model.bn1.running_mean.clone()
    shapes = feature_shapes(model, (3, 32, 32))
    assert shapes == {"layer3": (256, 8, 8), "layer4": (512, 4, 4), "logits": (10,)}
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
