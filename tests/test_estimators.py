"""Building, feeding, saving and loading the pair of MI estimators (utils/mi/estimators.py)."""
import argparse
import json

import pytest
import torch

from models import get_model
from models.estimator import build_estimator
from tests.helpers import save_estimators
from utils.cli import estimator_layer, estimator_settings, estimator_spec
from utils.data.splits import DatasetInfo
from utils.mi.estimators import (
    build_one_estimator,
    check_stage2_config,
    load_estimators,
    target_outputs,
)
from utils.script import UserError

# The release's file names (PAPER.md, README): _n holds E_n (natural), _a holds E_a (adversarial).
RELEASE_FILES = {
    ("natural", "local"): "local_n_model.pth",
    ("natural", "global"): "global_n_model.pth",
    ("adversarial", "local"): "local_a_model.pth",
    ("adversarial", "global"): "global_a_model.pth",
}


# The same four files in the release's order (natural local, natural global, adversarial local,
# adversarial global).
PAIR_FILES = tuple(RELEASE_FILES.values())


def _distinct_estimators(seed):
    torch.manual_seed(seed)
    return {kind: build_estimator(3, 10, hidden=16) for kind in ("natural", "adversarial")}


def part(est, name):
    return est.local if name == "local" else est.global_


def _differ(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def _assert_same_weights(module, state):
    own = module.state_dict()
    assert own.keys() == state.keys()
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("explicit", [False, True], ids=["mi_dir", "release_flags"])
def test_save_and_load_keep_each_estimator_in_its_own_files(tmp_path, explicit):
    """E_n and E_a have the same shapes, so a swap on load would go unnoticed by shape checks."""
    from utils.mi.estimators import load_estimators

    saved = _distinct_estimators(1)
    for name in ("local", "global"):
        assert _differ(part(saved["natural"], name), part(saved["adversarial"], name)), name
    save_estimators(saved, tmp_path)

    # Each file holds exactly its own module.
    for (kind, name), filename in RELEASE_FILES.items():
        _assert_same_weights(part(saved[kind], name), torch.load(tmp_path / filename, weights_only=True))

    loaded = _distinct_estimators(2)
    if explicit:
        # Point each key at a renamed copy, so the names inside the folder cannot help.
        paths = {}
        for i, (key, filename) in enumerate(RELEASE_FILES.items()):
            paths[key] = tmp_path / f"copy{i}.pth"
            paths[key].write_bytes((tmp_path / filename).read_bytes())
        load_estimators(loaded, None, paths)
    else:
        load_estimators(loaded, tmp_path)
    for kind, name in RELEASE_FILES:
        _assert_same_weights(part(loaded[kind], name), part(saved[kind], name).state_dict())


def test_each_part_is_written_to_its_own_file(tmp_path):
    """What stage 2 writes every epoch: ``estimator_best_files`` maps each release file name to its part."""
    torch.manual_seed(3)
    ests = {k: build_estimator(3, 10, hidden=16) for k in ("natural", "adversarial")}
    save_estimators(ests, tmp_path)
    for name, (kind, part) in zip(PAIR_FILES, [("natural", "local"), ("natural", "global_"),
                                               ("adversarial", "local"), ("adversarial", "global_")]):
        state = torch.load(tmp_path / name, weights_only=True)
        want = getattr(ests[kind], part).state_dict()
        assert state.keys() == want.keys(), name
        assert all(torch.equal(state[k], want[k]) for k in state), name
        other = getattr(ests["adversarial" if kind == "natural" else "natural"], part).state_dict()
        assert any(not torch.equal(state[k], other[k]) for k in state), name  # a swap would show


# --- direct tests of the other helpers --------------------------------------------------------

INFO = DatasetInfo("synthetic", num_classes=10, in_channels=3, image_size=32, crop_padding=4, flip=True)


def _args(**flags):
    return argparse.Namespace(**{"va_mode": "dv", "va_hsize": 16, "is_internal": False, "is_internal_last": False,
                                 **flags})


def test_save_then_load_round_trips_all_four_files(tmp_path):
    saved = _distinct_estimators(3)
    save_estimators(saved, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PAIR_FILES)
    loaded = _distinct_estimators(4)
    assert _differ(loaded["natural"], saved["natural"])
    load_estimators(loaded, tmp_path)
    for kind in ("natural", "adversarial"):
        _assert_same_weights(loaded[kind], saved[kind].state_dict())


@pytest.mark.parametrize("explicit", [False, True], ids=["mi_dir", "release_flags"])
def test_a_file_of_another_width_is_a_user_error_naming_the_flag(tmp_path, explicit):
    save_estimators(_distinct_estimators(1), tmp_path)  # H = 16
    wider = {kind: build_estimator(3, 10, hidden=32) for kind in ("natural", "adversarial")}
    if explicit:
        with pytest.raises(UserError) as err:
            load_estimators(wider, None, {key: tmp_path / name for key, name in RELEASE_FILES.items()})
        flag = "--pre-local-n"
    else:
        with pytest.raises(UserError) as err:
            load_estimators(wider, tmp_path)
        flag = "--mi-dir"
    message = str(err.value)
    assert message.startswith(flag + ":"), message
    assert "local_n_model.pth" in message and "does not fit" in message and "--va-hsize" in message


def test_a_missing_file_or_no_source_is_a_user_error_naming_the_flag(tmp_path):
    with pytest.raises(UserError, match="^--mi-dir: no checkpoint"):
        load_estimators(_distinct_estimators(1), tmp_path)
    with pytest.raises(UserError, match="--mi-dir or --pre-local-n"):
        load_estimators(_distinct_estimators(1))


def test_estimator_layer_maps_the_two_flags():
    assert estimator_layer(_args()) is None
    assert estimator_layer(_args(is_internal=True)) == "layer3"
    assert estimator_layer(_args(is_internal_last=True)) == "layer4"


def check(tmp_path, **flags):
    check_stage2_config(estimator_settings(_args(**flags)), tmp_path)


def test_check_stage2_config_refuses_estimator_flags_other_than_stage_2s(tmp_path):
    check(tmp_path, va_mode="nce")  # no config.json (the release's files): not checked
    (tmp_path / "config.json").write_text(json.dumps({"va_mode": "dv", "va_hsize": 16, "is_internal": False}))
    check(tmp_path, va_mode="dv")
    with pytest.raises(UserError, match="^--va-mode: ") as err:
        check(tmp_path, va_mode="nce")
    assert "'dv'" in str(err.value) and "'nce'" in str(err.value)
    with pytest.raises(UserError, match="^--va-hsize: "):
        check(tmp_path, va_hsize=32)
    with pytest.raises(UserError, match="^--is-internal: "):
        check(tmp_path, is_internal=True)


def test_a_stored_fd_mode_names_the_jsd_bound(tmp_path):
    """config.json keeps --va-mode as the stage-2 run resolved it; a folder that recorded ``fd`` (the
    release's spelling of the JSD bound) still matches ``jsd``."""
    (tmp_path / "config.json").write_text(json.dumps({"va_mode": "fd", "va_fd_measure": "JSD"}))
    check(tmp_path, va_mode="jsd")
    with pytest.raises(UserError, match="^--va-mode: "):
        check(tmp_path, va_mode="dv")


def test_target_outputs_gives_the_logits_or_a_layer_from_one_pass():
    target = get_model("smallcnn", 10, 3).eval()
    x = torch.rand(2, 3, 32, 32)
    calls = []
    target.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        logits, g = target_outputs(target, x, None)
        assert g is logits and len(calls) == 1
        logits3, g3 = target_outputs(target, x, "layer3")
        assert len(calls) == 2
        want_logits, feats = target(x, return_features=True)
    assert torch.equal(logits, want_logits) and torch.equal(logits3, want_logits)
    assert torch.equal(g3, feats["layer3"])


@pytest.mark.parametrize("flags,layer", [({}, None), ({"is_internal": True}, "layer3"),
                                         ({"is_internal_last": True}, "layer4")])
def test_build_one_estimator_reads_what_the_flags_name(flags, layer):
    target = get_model("smallcnn", 10, 3)
    est = build_one_estimator(estimator_spec(_args(**flags), INFO), target, torch.device("cpu"))
    assert est.global_.internal == layer
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        g = target_outputs(target.eval(), x, layer)[1]
        assert est.local(x).shape[1] == 16 and est.global_(g).shape == (4, 16, 1, 1)
        assert est.mi(x, g).shape == (4,)
