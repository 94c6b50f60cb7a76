"""A training run's folder and state: config.json, metrics.jsonl, curves.png, the best files and
last.pth, written so that an interrupted run resumes where it stopped."""
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from utils.attacks.base import bare_module
from utils.mi.release_compat import QUIRK_DEFAULTS
from utils.plots import plot_curves
from utils.script import NOTHING_TO_RESUME, UserError
from utils.training import distributed
from utils.training.checkpoint import (
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    metrics_records,
    state_dict,
    strip_prefixes,
)
from utils.training.device import rng_state, set_rng_state

# Flags that do not change what a run computes (or say how long it runs): --resume may change them.
RESUME_MAY_CHANGE = frozenset({"epochs", "resume", "overwrite", "no_progress", "device", "model_dir", "data_dir",
                               "save_freq", "workers", "amp", "channels_last", "compile", "compile_backend",
                               "no_cudnn_benchmark", "tf32", "balance_limit", "balance_batches",
                               "no_collapse_guard"})


class Run:
    """A training run: its folder, the modules, optimizer and scheduler it checkpoints, and the
    best-model selection.

    Each epoch ends by writing, in order, the best files, the metrics line and last.pth, each
    atomically, and then redraws curves.png; last.pth commits the epoch, so a run killed at any
    moment resumes from the last committed epoch and loses at most the current one."""

    def __init__(self, model_dir, config: dict, modules: Dict[str, nn.Module], optimizer, scheduler, *,
                 epochs: int, resume: bool = False, overwrite: bool = False, seed: int = 0, save_freq: int = 0,
                 held_out: bool = False, generator: Optional[torch.Generator] = None, select_by: str = "pgd_acc"):
        self.dir = Path(model_dir)
        self.flags = config
        self.modules = modules
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.epochs = epochs
        self.resume = resume
        self.overwrite = overwrite
        self.seed = seed
        self.save_freq = save_freq
        self.split = "val" if held_out else "test"
        self.generator = generator
        self.select_by = select_by
        self.best_score = -float("inf")
        self.dir.mkdir(parents=True, exist_ok=True)  # checked writable by the setup, before the data loaded
        self.metrics_path = self.dir / "metrics.jsonl"
        self.last_path = self.dir / "last.pth"

    @property
    def state(self) -> Dict[str, object]:
        """What last.pth holds besides the epoch: the modules, then the optimizer and scheduler."""
        return {**self.modules, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def start(self) -> int:
        """With --resume load last.pth; write config.json. Returns the first epoch to run.

        A fresh start refuses a folder that holds a run (unless --overwrite), and a resume
        refuses changed flags, so that no finished epoch is lost or continued under other
        settings by mistake. Under torchrun every process loads last.pth; only the first one
        writes files."""
        main = distributed.context().is_main
        if not self.resume:
            if not self.overwrite:
                if self.last_path.exists():
                    raise UserError(f"--model-dir {self.dir} already holds a run (last.pth): add --resume to "
                                    "continue it, --overwrite to replace it, or choose another --model-dir")
                if self.records():  # e.g. a committed run whose checkpoints were left out
                    raise UserError(f"--model-dir {self.dir} holds the metrics.jsonl of a run but no last.pth to "
                                    "resume: add --overwrite to replace it, or choose another --model-dir")
            if main:
                # What --overwrite replaces goes now: a Ctrl-C before epoch 1 is saved must not leave
                # the old last.pth to be resumed as if it were this run's.
                for old in (self.metrics_path, self.last_path, self.dir / "curves.png"):
                    if old.is_file():
                        old.unlink()
                self._write_config()
            distributed.barrier()
            distributed.seed_ranks(self.seed)
            return 1
        ckpt = load_checkpoint(self.last_path, "--resume")
        if not isinstance(ckpt, dict) or "epoch" not in ckpt:
            raise UserError(f"--resume: {self.last_path} is not a last.pth written by this project")
        self._check_same_flags(ckpt.get("args"))
        for name, obj in self.state.items():
            if name not in ckpt:
                raise UserError(f"--resume: {self.last_path} has no '{name}' entry")
            try:
                target = bare_module(obj) if isinstance(obj, nn.Module) else obj
                target.load_state_dict(strip_prefixes(ckpt[name]) if isinstance(obj, nn.Module) else ckpt[name])
            except (RuntimeError, ValueError, KeyError) as err:
                detail = " ".join(str(err).split())
                raise UserError(f"--resume: {self.last_path} does not fit this run's {name}: {detail[:200]}") from None
        self.best_score = ckpt.get("best_score", -float("inf"))
        self._restore_rng(ckpt)
        if main:
            self._truncate_metrics(ckpt["epoch"])
            self._write_config()
            if ckpt["epoch"] >= self.epochs:
                print(f"{self.last_path} is at epoch {ckpt['epoch']} of --epochs {self.epochs}: nothing to "
                      "train (raise --epochs to continue)", flush=True)
        distributed.barrier()
        return ckpt["epoch"] + 1

    def interrupted_advice(self) -> str:
        """What to tell the user after Ctrl-C: --resume only where there is an epoch to resume."""
        if self.last_path.is_file():
            return "interrupted; the last finished epoch is kept, continue with --resume"
        if self.records():
            # Between the first epoch's metrics line and its last.pth: the folder now looks like a run.
            return "interrupted while the first epoch was being saved: start again with --overwrite"
        return NOTHING_TO_RESUME

    def _restore_rng(self, ckpt: dict) -> None:
        """This process's RNG state as last.pth saved it, when the run had as many processes.

        Otherwise (another process count, or a last.pth from before per-process states) every
        process takes the first one's state, which holds the data order all of them share, and
        the others then draw fresh attack noise of their own, as on a fresh start."""
        ctx = distributed.context()
        per_rank = ckpt.get("rng_ranks")
        if isinstance(per_rank, list) and len(per_rank) == ctx.world_size:
            set_rng_state(per_rank[ctx.rank], self.generator)
            return
        set_rng_state(ckpt["rng"], self.generator)
        distributed.seed_ranks(self.seed + 7919 * ckpt["epoch"])

    def _write_config(self) -> None:
        atomic_write_text(self.dir / "config.json", json.dumps(self.flags, indent=2, sort_keys=True) + "\n")

    def _check_same_flags(self, stored: Optional[dict]) -> None:
        if not isinstance(stored, dict):
            return
        now = self.flags
        # A run written before the --release-* flags or --mi-grad-clip existed ran with each of them off.
        stored = {**{k: v for k, v in {**QUIRK_DEFAULTS, "mi_grad_clip": None}.items() if k in now}, **stored}
        # A flag added since (e.g. --overwrite) does not make an older run another script's.
        if set(stored) - RESUME_MAY_CHANGE != set(now) - RESUME_MAY_CHANGE:
            raise UserError(f"--resume: {self.last_path} was written by another script or version "
                            "(its flags differ); choose another --model-dir")
        changed = [k for k in sorted(set(now) - RESUME_MAY_CHANGE) if stored[k] != now[k]]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {stored[k]!r} (now {now[k]!r})" for k in changed)
            raise UserError(f"--resume: {self.last_path} was trained with {flags}; resume with the same flags "
                            "or start another --model-dir")

    def records(self) -> list:
        return metrics_records(self.metrics_path)

    def _truncate_metrics(self, last_epoch: int) -> None:
        if self.metrics_path.exists():
            kept = [r for r in self.records() if r["epoch"] <= last_epoch]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def _plot_curves(self) -> None:
        path = self.dir / "curves.png"
        try:
            plot_curves(self.records(), path, title=str(self.dir))
        except OSError as err:  # the epoch is committed already: a picture is not worth stopping for
            print(f"warning: could not write {path}: {err}", file=sys.stderr, flush=True)

    def end_epoch(self, epoch: int, metrics: dict, best: Dict[str, nn.Module]) -> dict:
        """Save the best files if ``metrics[select_by]`` improved, log the metrics, then last.pth."""
        score = epoch if self.select_by == "epoch" else metrics[self.select_by]
        improved = score > self.best_score
        # Stage 2 selects by epoch number: its files are the last epoch's, whatever the metrics say.
        record = {"epoch": epoch, **metrics, "best": improved, "evaluated_on": self.split,
                  "selected_on": "last epoch" if self.select_by == "epoch" else self.split}
        rngs = distributed.all_gather_object(rng_state(self.generator))  # each process resumes its own
        if not distributed.context().is_main:
            self.best_score = max(score, self.best_score)
            distributed.barrier()
            return record
        if improved:
            self.best_score = score
            for filename, module in best.items():
                atomic_save(state_dict(module), self.dir / filename)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.save_freq and epoch % self.save_freq == 0:
            for filename, module in best.items():
                stem = Path(filename).stem.replace("best_", "")
                atomic_save(state_dict(module), self.dir / f"{stem}_epoch{epoch}.pth")
        ckpt = {name: (state_dict(obj) if isinstance(obj, nn.Module) else obj.state_dict())
                for name, obj in self.state.items()}
        ckpt.update(epoch=epoch, best_score=self.best_score, rng=rngs[0], args=self.flags)
        if len(rngs) > 1:
            ckpt["rng_ranks"] = rngs
        atomic_save(ckpt, self.last_path)
        self._plot_curves()
        distributed.barrier()
        return record
