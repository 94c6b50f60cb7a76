"""Files that must never be half-written or run code: atomic writes, checkpoints loaded with
``weights_only=True``, and a run folder's config.json and metrics.jsonl."""
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from utils.attacks.base import bare_module
from utils.script import UserError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path, write: Callable, binary: bool) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files: give the permissions any other new file would get.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def writable_dir(path, flag: str) -> Path:
    """Create ``path`` if needed and make sure files can be written there, before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag}: cannot write to {path}: {err.strerror or err}") from None
    return path


def load_checkpoint(path, flag: str):
    """Load with ``weights_only=True``: a checkpoint holding code is refused, never run."""
    path = Path(path)
    if path.is_dir():
        hint = ": give it as --model-dir, or name the .pth file" if flag == "--checkpoint" else ""
        raise UserError(f"{flag}: {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which would run whatever the file holds.
        what = ("it names code to run, refused" if "GLOBAL" in str(err)
                else "not a PyTorch checkpoint, or a damaged one")
        raise UserError(f"{flag}: {path} is not a tensor-only PyTorch checkpoint ({what})") from None
    except Exception as err:  # truncated, or not a zip/pickle at all
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag}: {path} is not a readable weights-only checkpoint ({reason[:160]})") from None


def strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_weights(module: nn.Module, path, flag: str, what: str) -> None:
    """Load a plain state_dict (or the ``model`` entry of ``last.pth``) into ``module``, strictly."""
    state = load_checkpoint(path, flag)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag}: {path} does not hold a state_dict")
    try:
        bare_module(module).load_state_dict(strip_prefixes(state), strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{flag}: {path} does not fit {what}: {detail[:240]}") from None


def state_dict(module: nn.Module) -> dict:
    return bare_module(module).state_dict()


def run_config(folder) -> dict:
    """The flags a training run recorded in its config.json ({} when there is none or it is unreadable)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def metrics_records(path) -> list:
    """The epochs of a metrics.jsonl, in order; a line torn by a crash mid-write is skipped (its epoch is redone)."""
    path = Path(path)
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            found.append(record)
    return found


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
