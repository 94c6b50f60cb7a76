"""Files that must never be half-written or run code: atomic writes, checkpoints loaded with
``weights_only=True``, and a run folder's config.json and metrics.jsonl."""
import argparse
import json
import os
import pickle
import re
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


# The numpy dtypes of numbers: what training code commonly stores beside its weights (an epoch
# count, an accuracy). Object, string and void dtypes stay refused.
_NUMERIC_DTYPES = ("Bool", "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble",
                   "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Byte", "UByte",
                   "Short", "UShort", "Int", "UInt", "Long", "ULong", "LongLong", "ULongLong")


def harmless_globals() -> list:
    """Types that other codebases' checkpoints hold beside their weights and that build only data:
    numpy scalars and numeric dtypes, and argparse.Namespace (the flags of the run)."""
    found = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return found
    core = getattr(np, "_core", None) or np.core
    found += [core.multiarray.scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 builds a dtype through its class
    if dtypes is not None:
        found += [getattr(dtypes, f"{n}DType") for n in _NUMERIC_DTYPES if hasattr(dtypes, f"{n}DType")]
    return found


def load_checkpoint(path, flag: str):
    """Load with ``weights_only=True``: a checkpoint holding code is refused, never run. Tensors
    saved on a GPU come back on the CPU; numpy numbers and an argparse.Namespace beside the weights
    are allowed (``harmless_globals``)."""
    path = Path(path)
    if path.is_dir():
        hint = ": give it as --model-dir, or name the .pth file" if flag == "--checkpoint" else ""
        raise UserError(f"{flag}: {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(harmless_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which would run whatever the file holds.
        named = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"but got <class '([\w.]+)'>", str(err))
        what = (f"it names code to run ({named.group(1)}), refused" if named
                else "it names code to run, refused" if "GLOBAL" in str(err)
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


# Where other codebases nest the state_dict inside a checkpoint (``model`` is also last.pth's).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")
# How many missing and unexpected keys a mismatch names.
SHOWN_KEYS = 3


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def find_state_dict(obj):
    """The state_dict in a loaded checkpoint: the object itself, or nested (at most twice) under
    one of ``STATE_DICT_KEYS``; None when there is none."""
    for _ in range(3):
        if _is_state_dict(obj):
            return obj
        if not isinstance(obj, dict):
            return None
        obj = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
    return None


def _some(keys) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


def load_weights(module: nn.Module, path, flag: str, what: str, arch_flag: str = "--arch") -> None:
    """Load a state_dict (plain, or nested as ``find_state_dict`` finds it) into ``module``, strictly;
    ``module.`` and ``_orig_mod.`` prefixes (DataParallel/DDP, torch.compile) are dropped first."""
    found = find_state_dict(load_checkpoint(path, flag))
    if found is None:
        raise UserError(f"{flag}: {path} does not hold a state_dict (plain, or under one of "
                        f"{', '.join(STATE_DICT_KEYS)})")
    state = strip_prefixes(found)
    target = bare_module(module)
    expected = list(target.state_dict())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in set(expected)]
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s) ({_some(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_some(unexpected)})" if unexpected else ""]
        raise UserError(f"{flag}: {path} does not fit {what}: " + ", ".join(filter(None, parts))
                        + f"; give the architecture it was saved from with {arch_flag}")
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:  # the keys fit, a shape does not
        detail = " ".join(str(err).split())
        raise UserError(f"{flag}: {path} does not fit {what}: {detail[:240]}; "
                        f"give the architecture it was saved from with {arch_flag}") from None


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
