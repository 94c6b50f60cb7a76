"""Building, feeding, saving and loading the pair of MI estimators (E_n, E_a) of PAPER.md §3.

Files use the release's names: local_n_model.pth, global_n_model.pth, local_a_model.pth,
global_a_model.pth, each a plain state_dict."""
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from models import feature_shapes
from models.estimator import MIEstimator, build_estimator
from utils.attacks.base import bare_module
from utils.mi.bounds import resolve_mode
from utils.script import UserError
from utils.training.checkpoint import load_weights, run_config

ESTIMATOR_FILES = {
    ("natural", "local"): "local_n_model.pth",
    ("natural", "global"): "global_n_model.pth",
    ("adversarial", "local"): "local_a_model.pth",
    ("adversarial", "global"): "global_a_model.pth",
}
RELEASE_FLAGS = {
    ("natural", "local"): "--pre-local-n",
    ("natural", "global"): "--pre-global-n",
    ("adversarial", "local"): "--pre-local-a",
    ("adversarial", "global"): "--pre-global-a",
}


class EstimatorSpec(NamedTuple):
    """Which estimator to build (PAPER.md §3): the width H, the target layer its global net reads
    (None: the logits; "layer3" or "layer4"), and the images and classes of the dataset."""
    hsize: int
    layer: Optional[str]
    in_channels: int
    num_classes: int
    image_size: int = 32


def internal_layer(is_internal: bool = False, is_internal_last: bool = False) -> Optional[str]:
    """The target layer the global nets read (``--is-internal``: layer3, ``--is-internal-last``:
    layer4), or None: the logits."""
    return "layer3" if is_internal else "layer4" if is_internal_last else None


def check_stage2_config(settings: Dict[str, object], mi_dir) -> None:
    """Refuse estimator settings (flag name without "--" -> value) that differ from those the
    stage-2 run in ``mi_dir`` recorded in its config.json (a folder without one, e.g. the
    release's files, is not checked)."""
    stored = dict(run_config(mi_dir))
    if "va_mode" in stored:  # the flag as given (fd + --va-fd-measure) names the same bound as its resolved form
        stored["va_mode"] = resolve_mode(stored["va_mode"], stored.get("va_fd_measure", "JSD"))
    for key, now in settings.items():
        if key in stored and stored[key] != now:
            raise UserError(f"--{key.replace('_', '-')}: the estimators in {mi_dir} were trained with "
                            f"{stored[key]!r}, not {now!r}; pass the same value")


def build_one_estimator(spec: EstimatorSpec, target: nn.Module, device) -> MIEstimator:
    """One estimator for this dataset and target."""
    shape = None
    if spec.layer is not None:
        # The plain module: a torch.compile wrapper would compile one more graph for this probe.
        shape = feature_shapes(bare_module(target), (spec.in_channels, spec.image_size, spec.image_size))[spec.layer]
    return build_estimator(spec.in_channels, spec.num_classes, spec.hsize, spec.layer, shape).to(device)


def build_estimators(spec: EstimatorSpec, target: nn.Module, device) -> Dict[str, MIEstimator]:
    """E_n and E_a (PAPER.md §3)."""
    return {kind: build_one_estimator(spec, target, device) for kind in ("natural", "adversarial")}


STANDARD_FILES = {"local": "local_std_model.pth", "global": "global_std_model.pth"}
ESTIMATOR_HINT = "the estimator built from --va-hsize/--is-internal/--is-internal-last and the dataset"


def load_standard_estimator(estimator: MIEstimator, mi_dir) -> MIEstimator:
    """The WMIM estimator of Î(x̃; h(x̃)), as train_MI_estimator_only_max.py --standard-mi saved it."""
    load_weights(estimator.local, Path(mi_dir) / STANDARD_FILES["local"], "--mi-dir", ESTIMATOR_HINT)
    load_weights(estimator.global_, Path(mi_dir) / STANDARD_FILES["global"], "--mi-dir", ESTIMATOR_HINT)
    return estimator


def target_outputs(target: nn.Module, x: torch.Tensor, layer: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of the target: (logits, what the global nets read)."""
    if layer is None:
        logits = target(x)
        return logits, logits
    logits, feats = target(x, return_features=True)
    return logits, feats[layer]


def estimator_best_files(estimators: Dict[str, MIEstimator]) -> Dict[str, nn.Module]:
    """The release's four file names mapped to the modules they hold (for ``Run.end_epoch``)."""
    return {filename: (estimators[kind].local if part == "local" else estimators[kind].global_)
            for (kind, part), filename in ESTIMATOR_FILES.items()}


def load_estimators(estimators: Dict[str, MIEstimator], mi_dir=None, paths: Optional[Dict] = None) -> None:
    """Load the four files from ``mi_dir``, or from explicit ``paths`` keyed like ESTIMATOR_FILES.

    A file that is missing or does not fit the estimator built from the flags (another H,
    another internal variant, another dataset) gives a one-line UserError."""
    for key, filename in ESTIMATOR_FILES.items():
        explicit = (paths or {}).get(key)
        if explicit is not None:
            path, flag = Path(explicit), RELEASE_FLAGS[key]
        elif mi_dir is not None:
            path, flag = Path(mi_dir) / filename, "--mi-dir"
        else:
            raise UserError(f"no estimator given: pass --mi-dir or {RELEASE_FLAGS[key]}")
        kind, part = key
        module = estimators[kind].local if part == "local" else estimators[kind].global_
        load_weights(module, path, flag, ESTIMATOR_HINT)
