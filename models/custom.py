"""Models from outside this package, and inputs normalised inside the model (PAPER.md §7).

- An architecture is a name of :data:`models.MODEL_NAMES` or ``module.path:callable``: the
  callable is imported from the working directory or ``PYTHONPATH`` and called as
  ``callable(num_classes=K)``; it must return an ``nn.Module`` taking images in [0, 1].
- :class:`Normalized` runs ``(x - mean) / std`` inside ``forward``, so every attack still
  perturbs, clips and measures images in [0, 1]. Its ``state_dict`` carries the wrapped
  network's own keys (no prefix), so a checkpoint loads into the bare architecture and back;
  mean and std are not weights and live in the run's config.json instead.

Errors are ``ValueError`` with a one-line message; scripts name their flag in front of it."""
from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import MODEL_NAMES, get_model

# Per-channel statistics of the CIFAR-10 training images (the values most released models use).
NORMALIZE_PRESETS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))}


class Normalization(NamedTuple):
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def is_custom_arch(arch: str) -> bool:
    return ":" in arch


def check_arch(arch: str) -> str:
    """``arch`` if it names a built-in architecture or looks like ``module.path:callable``."""
    if is_custom_arch(arch):
        module, _, name = arch.partition(":")
        if not module.strip() or not name.strip() or ":" in name:
            raise ValueError(f"{arch!r} is not module.path:callable (e.g. mymodels:resnet)")
        return arch
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(MODEL_NAMES)}, or module.path:callable")
    return arch


def import_callable(arch: str):
    """The callable that ``module.path:callable`` names, imported with the working directory on the path
    (a script's own folder, not the working directory, is what Python puts there)."""
    module_name, _, name = check_arch(arch).partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not found, or the module itself fails: a SyntaxError, an ImportError inside
        raise ValueError(f"{arch}: cannot import {module_name} ({type(err).__name__}: {_first_line(err)})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    target = module
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"{arch}: {module_name} ({getattr(module, '__file__', '?')}) has no {name}")
    if not callable(target):
        raise ValueError(f"{arch}: {module_name}.{name} is a {type(target).__name__}, not a callable")
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


def build_model(arch: str, num_classes: int, in_channels: int = 3,
                normalize: Optional[Normalization] = None) -> nn.Module:
    """``arch`` (a built-in name or ``module.path:callable``), wrapped in :class:`Normalized` when
    ``normalize`` is given."""
    if is_custom_arch(arch):
        factory = import_callable(arch)
        try:
            model = factory(num_classes=num_classes)
        except Exception as err:
            raise ValueError(f"{arch}: calling it with num_classes={num_classes} failed "
                             f"({type(err).__name__}: {_first_line(err)})") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"{arch}: returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        model = get_model(check_arch(arch), num_classes=num_classes, in_channels=in_channels)
    return normalized(model, normalize, in_channels)


def normalized(model: nn.Module, normalize: Optional[Normalization], in_channels: int) -> nn.Module:
    """``model`` wrapped in :class:`Normalized` (unchanged for None)."""
    if normalize is None:
        return model
    if len(normalize.mean) != in_channels:
        raise ValueError(f"{len(normalize.mean)} channel mean(s) for images of {in_channels} channel(s)")
    return Normalized(model, normalize.mean, normalize.std)


def parse_normalization(text: str) -> Normalization:
    """``MEAN/STD`` as comma lists of one value per channel, or a preset name (``cifar10``)."""
    key = text.strip().lower()
    if key in NORMALIZE_PRESETS:
        return Normalization(*NORMALIZE_PRESETS[key])
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(f"{text!r} is neither MEAN/STD (comma lists, one value per channel) nor a preset "
                         f"({', '.join(NORMALIZE_PRESETS)})")
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in parts)
    except ValueError:
        raise ValueError(f"{text!r}: MEAN and STD must be comma lists of numbers") from None
    if len(mean) != len(std):
        raise ValueError(f"{text!r}: {len(mean)} means but {len(std)} standard deviations")
    if not all(s > 0 for s in std) or not all(abs(m) < float("inf") for m in mean):
        raise ValueError(f"{text!r}: the standard deviations must be positive and the means finite")
    return Normalization(mean, std)


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1]; ``return_features`` is passed on.

    The state_dict hooks drop and restore the ``net.`` prefix, so the keys are the network's own."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        # Not persistent: a checkpoint holds weights only, config.json says how inputs are normalised.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._register_state_dict_hook(_drop_net_prefix)
        self._register_load_state_dict_pre_hook(_add_net_prefix)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x = (x - self.mean) / self.std
        # Only when asked: a network of one's own need not take the keyword at all.
        return self.net(x, return_features=True) if return_features else self.net(x)

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


def _drop_net_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    return state_dict


def _add_net_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
