"""Training plumbing shared by the scripts: devices, seeding, checkpoints, metrics, resume."""
import contextlib
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import distributed
from utils.attacks.base import bare_module, unwrap
from utils.attacks.pgd import pgd
from utils.release_compat import QUIRK_DEFAULTS


class UserError(Exception):
    """A mistake in the user's input. Scripts print its one-line message and exit with 2."""


# The last.pth of the run this process is training, for the advice after Ctrl-C.
_LAST_CHECKPOINT: Optional[Path] = None


def interrupted_run() -> str:
    """What a training script says after Ctrl-C: --resume only where there is an epoch to resume."""
    if _LAST_CHECKPOINT is not None and _LAST_CHECKPOINT.is_file():
        return "interrupted; the last finished epoch is kept, continue with --resume"
    if _LAST_CHECKPOINT is not None and metrics_records(_LAST_CHECKPOINT.with_name("metrics.jsonl")):
        # Between the first epoch's metrics line and its last.pth: the folder now looks like a run.
        return "interrupted while the first epoch was being saved: start again with --overwrite"
    return "interrupted before an epoch finished, so there is nothing to resume: run the same command again"


def run_main(main: Callable[[], None], interrupted: Optional[str] = None) -> None:
    """Run a script's main: user mistakes become one line on stderr and exit status 2; Ctrl-C
    prints ``interrupted`` (by default, the advice of :func:`interrupted_run`) and exits with
    130; a closed output pipe (``| head``) ends the script quietly."""
    from utils.data import DataError  # local: data imports torchvision, which is slow to import

    global _LAST_CHECKPOINT
    _LAST_CHECKPOINT = None  # set by this script's Run, not by one an earlier call made in this process
    prog = Path(sys.argv[0]).name
    # Under torchrun every process meets the same mistake: one of them says so.
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        main()
        # After main has returned, so no DDP wrapper still holds the process group; not after an
        # error, where another process may never reach the barrier.
        distributed.shutdown()
    except (UserError, DataError) as err:
        if speaks:
            print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if speaks:
            print(f"{prog}: {interrupted or interrupted_run()}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader has gone: silence the interpreter's own flush of stdout at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


# --- RNG state, so that a resumed run draws the same numbers as an uninterrupted one ---

def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_initialized():  # this process's GPU: under torchrun the others belong to other processes
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # an older last.pth: one state per GPU it saw
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# --- checkpoints ---

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


def _strip_prefixes(state: dict) -> dict:
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
        bare_module(module).load_state_dict(_strip_prefixes(state), strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise UserError(f"{flag}: {path} does not fit {what}: {detail[:240]}") from None


def state_dict(module: nn.Module) -> dict:
    return bare_module(module).state_dict()


# --- metrics and the per-epoch loop ---

def epsilon_at(epoch: int, args) -> float:
    """Training budget at ``epoch`` (1-based): 0 in clean warm-up epochs, then an optional linear ramp."""
    adversarial_epoch = epoch - args.warm_up_epochs
    if adversarial_epoch < 1:
        return 0.0
    ramp = getattr(args, "epsilon_ramp_epochs", 0)
    if ramp > 0 and adversarial_epoch < ramp:
        return args.epsilon * adversarial_epoch / ramp
    return args.epsilon


class Meter:
    """Running sums kept as tensors, so training never waits on the device for a ``.item()``."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor, n: float = 1.0) -> None:
        value = value.detach().float() * n
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0.0) + n

    def result(self) -> Dict[str, float]:
        """Means over everything added, summed over all processes under torchrun."""
        names = sorted(self.sums)
        if not names:
            return {}
        sums = torch.stack([self.sums[k].reshape(()) for k in names]).double()
        counts = torch.tensor([self.counts[k] for k in names], dtype=torch.float64, device=sums.device)
        distributed.all_reduce_sum(sums)
        distributed.all_reduce_sum(counts)
        return {k: float(s) / max(float(c), 1e-12) for k, s, c in zip(names, sums.cpu(), counts.cpu())}


@dataclass(frozen=True)
class FastPath:
    """GPU fast-path options that change how a step is computed, not what it computes.

    ``amp``: bf16 autocast for the model's forward passes (attack steps included); losses,
    input gradients and the MI scores stay in fp32. ``channels_last``: NHWC batches."""
    amp: bool = False
    channels_last: bool = False

    @classmethod
    def from_args(cls, args) -> "FastPath":
        return cls(amp=getattr(args, "amp", False), channels_last=getattr(args, "channels_last", False))

    def autocast(self, device: torch.device):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple]


def train_epoch(model: nn.Module, loader, step: StepFn, optimizer, desc: str,
                progress: bool = True, fast: FastPath = FastPath()) -> Dict[str, float]:
    """One pass over ``loader``. ``step(x, y)`` returns (loss, logits for accuracy, {name: scalar})."""
    model.train()
    meter = Meter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for x, y in bar:
        x = fast.batch(x)
        with fast.autocast(x.device):
            loss, logits, extra = step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed.context().enabled and not isinstance(model, nn.parallel.DistributedDataParallel):
            distributed.average_gradients(model)  # e.g. the stage-2 estimators, used through their parts
        optimizer.step()
        n = y.shape[0]
        meter.add("train_loss", loss, n)
        meter.add("train_acc", (logits.argmax(dim=1) == y).float().mean() * 100, n)
        for name, value in extra.items():
            meter.add(name, torch.as_tensor(value, device=y.device), 1.0)
    return meter.result()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the block; each module's own mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def evaluate(model: nn.Module, loader, epsilon: float, step_size: float, num_steps: int, norm: str,
             progress: bool = True, desc: str = "eval", fast: FastPath = FastPath()) -> Dict[str, float]:
    """Clean and PGD accuracy (%) in eval mode, summed over all processes under torchrun."""
    net = unwrap(model)  # no DDP collectives per batch: each process evaluates its own shard
    counts = None
    with eval_mode(net):
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            x = fast.batch(x)
            with fast.autocast(x.device):
                with torch.no_grad():
                    clean = (net(x).argmax(dim=1) == y).sum()
                x_adv = pgd(net, x, y, epsilon, step_size, num_steps, norm)
                with torch.no_grad():
                    robust = (net(x_adv).argmax(dim=1) == y).sum()
            batch = torch.stack([clean, robust, torch.tensor(y.shape[0], device=y.device)]).double()
            counts = batch if counts is None else counts + batch
    if counts is None:  # an empty shard still joins the reduction
        counts = torch.zeros(3, dtype=torch.float64)
    distributed.all_reduce_sum(counts)
    clean_acc, pgd_acc = (100.0 * counts[:2] / counts[2].clamp_min(1)).tolist()
    return {"clean_acc": clean_acc, "pgd_acc": pgd_acc}


def cross_entropy_step(model: nn.Module) -> StepFn:
    """A clean training step, for warm-up epochs."""
    def step(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}
    return step


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


class Run:
    """A training run's folder: config.json, metrics.jsonl, curves.png, the best files and last.pth.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (model,
    optimizer, scheduler, ...). Each epoch ends by writing, in order, the best files, the
    metrics line and last.pth, each atomically, and then redraws curves.png; last.pth commits
    the epoch, so a run killed at any moment resumes from the last committed epoch and loses
    at most the current one."""

    def __init__(self, args, state: Dict[str, object], generator: Optional[torch.Generator] = None,
                 select_by: str = "pgd_acc"):
        self.args = args
        self.dir = Path(args.model_dir)
        self.state = state
        self.generator = generator
        self.select_by = select_by
        self.best_score = -float("inf")
        self.dir.mkdir(parents=True, exist_ok=True)  # checked writable by the setup, before the data loaded
        self.metrics_path = self.dir / "metrics.jsonl"
        self.last_path = self.dir / "last.pth"
        self.started = time.time()
        global _LAST_CHECKPOINT
        _LAST_CHECKPOINT = self.last_path

    def config(self) -> dict:
        return {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}

    def start(self) -> int:
        """With --resume load last.pth; write config.json. Returns the first epoch to run.

        A fresh start refuses a folder that holds a run (unless --overwrite), and a resume
        refuses changed flags, so that no finished epoch is lost or continued under other
        settings by mistake. Under torchrun every process loads last.pth; only the first one
        writes files."""
        main = distributed.context().is_main
        if not getattr(self.args, "resume", False):
            if not getattr(self.args, "overwrite", False):
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
            distributed.seed_ranks(getattr(self.args, "seed", 0))
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
                target.load_state_dict(_strip_prefixes(ckpt[name]) if isinstance(obj, nn.Module) else ckpt[name])
            except (RuntimeError, ValueError, KeyError) as err:
                detail = " ".join(str(err).split())
                raise UserError(f"--resume: {self.last_path} does not fit this run's {name}: {detail[:200]}") from None
        self.best_score = ckpt.get("best_score", -float("inf"))
        self._restore_rng(ckpt)
        if main:
            self._truncate_metrics(ckpt["epoch"])
            self._write_config()
            if ckpt["epoch"] >= self.args.epochs:
                print(f"{self.last_path} is at epoch {ckpt['epoch']} of --epochs {self.args.epochs}: nothing to "
                      "train (raise --epochs to continue)", flush=True)
        distributed.barrier()
        return ckpt["epoch"] + 1

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
        distributed.seed_ranks(getattr(self.args, "seed", 0) + 7919 * ckpt["epoch"])

    def _write_config(self) -> None:
        atomic_write_text(self.dir / "config.json", json.dumps(self.config(), indent=2, sort_keys=True) + "\n")

    def _check_same_flags(self, stored: Optional[dict]) -> None:
        if not isinstance(stored, dict):
            return
        now = self.config()
        # A run written before the --release-* flags existed ran with each of them off.
        stored = {**{k: v for k, v in QUIRK_DEFAULTS.items() if k in now}, **stored}
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
        # Imported here: utils.plots writes through this module's atomic_write.
        from utils.plots import plot_curves

        path = self.dir / "curves.png"
        try:
            plot_curves(self.records(), path, title=str(self.dir))
        except OSError as err:  # the epoch is committed already: a picture is not worth stopping for
            print(f"warning: could not write {path}: {err}", file=sys.stderr, flush=True)

    def end_epoch(self, epoch: int, metrics: dict, best: Dict[str, nn.Module]) -> dict:
        """Save the best files if ``metrics[select_by]`` improved, log the metrics, then last.pth."""
        score = metrics[self.select_by]
        improved = score > self.best_score
        split = "val" if getattr(self.args, "val_size", 0) else "test"
        # Stage 2 selects by epoch number: its files are the last epoch's, whatever the metrics say.
        record = {"epoch": epoch, **metrics, "best": improved, "evaluated_on": split,
                  "selected_on": "last epoch" if self.select_by == "epoch" else split}
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
        if self.args.save_freq and epoch % self.args.save_freq == 0:
            for filename, module in best.items():
                stem = Path(filename).stem.replace("best_", "")
                atomic_save(state_dict(module), self.dir / f"{stem}_epoch{epoch}.pth")
        ckpt = {name: (state_dict(obj) if isinstance(obj, nn.Module) else obj.state_dict())
                for name, obj in self.state.items()}
        ckpt.update(epoch=epoch, best_score=self.best_score, rng=rngs[0], args=self.config())
        if len(rngs) > 1:
            ckpt["rng_ranks"] = rngs
        atomic_save(ckpt, self.last_path)
        self._plot_curves()
        distributed.barrier()
        return record


# Flags that do not change what a run computes (or say how long it runs): --resume may change them.
RESUME_MAY_CHANGE = frozenset({"epochs", "resume", "overwrite", "no_progress", "device", "model_dir", "data_dir",
                               "save_freq", "workers", "amp", "channels_last", "compile", "no_cudnn_benchmark"})


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def format_metrics(record: dict) -> str:
    names = ("epoch", "lr", "train_loss", "train_acc", "clean_acc", "pgd_acc", "train_seconds", "seconds")
    keys = [k for k in names if k in record]
    return "  ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in keys)


def fit_target(args, model: nn.Module, optimizer, scheduler, run: "Run", train_loader, eval_loader,
               adversarial_step: Callable, best_file: str,
               on_epoch: Optional[Callable[[int], None]] = None) -> None:
    """The epoch loop of stages 1 and 3.

    ``adversarial_step(x, y, epsilon, step_size)`` returns (loss, logits, scalars). Clean
    warm-up epochs and the ε ramp come from ``epsilon_at``; each epoch ends with clean and
    PGD accuracy on the evaluation split and ``run.end_epoch``. ``on_epoch(epoch)`` is called
    as each epoch begins."""
    for epoch in range(run.start(), args.epochs + 1):
        began = time.time()
        if on_epoch is not None:
            on_epoch(epoch)
        eps = epsilon_at(epoch, args)
        step_size = args.step_size * eps / args.epsilon
        if eps > 0:
            def step(x, y, eps=eps, step_size=step_size):
                return adversarial_step(x, y, eps, step_size)
        else:
            step = cross_entropy_step(model)
        lr = optimizer.param_groups[0]["lr"]
        progress = not getattr(args, "no_progress", False) and distributed.context().is_main
        fast = FastPath.from_args(args)
        stats = train_epoch(model, train_loader, step, optimizer, f"epoch {epoch}/{args.epochs}", progress, fast)
        # train_epoch reads its metrics back from the device, so the clock has waited for the GPU
        stats["train_seconds"] = time.time() - began
        check_finite(stats, epoch)
        scheduler.step()
        stats.update(evaluate(model, eval_loader, args.epsilon, args.step_size, args.eval_steps, args.distance,
                              progress, fast=fast))
        stats["mean_acc"] = (stats["clean_acc"] + stats["pgd_acc"]) / 2
        record = run.end_epoch(epoch, {"lr": lr, "train_epsilon": eps, **stats, "seconds": time.time() - began},
                               best={best_file: model})
        if distributed.context().is_main:
            print(format_metrics(record), flush=True)


def check_finite(stats: Dict[str, float], epoch: int) -> None:
    """Stop a diverged run before its epoch is committed, rather than train on NaN to the end."""
    loss = stats.get("train_loss")
    if loss is not None and not math.isfinite(loss):
        raise UserError(f"training diverged in epoch {epoch} (train_loss {loss}); last.pth keeps epoch {epoch - 1}: "
                        "lower --lr (or --alpha, --lr-mi)")


def prepare_device(args) -> torch.device:
    """Join torchrun's process group if launched by it, pick this process's device, and set
    cudnn.benchmark (fixed input shapes: let cuDNN pick the fastest kernels)."""
    ctx = distributed.init(args.device)
    device = distributed.device_for(resolve_device(args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not getattr(args, "no_cudnn_benchmark", False)
    if ctx.enabled and args.batch_size % ctx.world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global batch: it must divide evenly over "
                        f"{ctx.world_size} processes")
    return device


def speed_up(model: nn.Module, args) -> nn.Module:
    """channels_last, SyncBatchNorm, torch.compile and DDP, as the flags ask; returns what to train.

    The plain module stays reachable through ``bare_module`` for checkpoints."""
    if getattr(args, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    if getattr(args, "sync_bn", False) and distributed.context().enabled:
        if next(model.parameters()).device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if getattr(args, "compile", False):
        model = compiled(model)
    return distributed.wrap(model)


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``, with room for every graph a run needs.

    Dynamo compiles one graph per combination it meets: train or eval mode, parameter
    gradients on or off (attacks switch them off), grad mode, input gradients, and the smaller
    last batch. A NAMID run with TRADES needs 7; past the default limit of 8, Dynamo would
    fall back to eager mode without a word."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 32))
    return torch.compile(model)


def shard(split, ctx=None):
    """This process's share of an evaluation split: every world_size-th sample, no padding, so
    the summed counts are exact."""
    ctx = ctx or distributed.context()
    if not ctx.enabled:
        return split
    return split.subset(torch.arange(ctx.rank, len(split), ctx.world_size))


def training_loaders(args, splits, info, device, generator: torch.Generator):
    """The shuffled, augmented training loader (this process's share of each --batch-size batch)
    and the loader of this process's shard of the selection split (val if held out, else test)."""
    from utils.data import BatchLoader

    ctx = distributed.context()
    train_loader = BatchLoader(splits["train"].to(device), args.batch_size // ctx.world_size, shuffle=True,
                               augment=True, info=info, device=device, generator=generator, rank=ctx.rank,
                               world_size=ctx.world_size)
    eval_split = splits["val"] if splits["val"] is not None else splits["test"]
    return train_loader, BatchLoader(shard(eval_split).to(device), args.batch_size, device=device)


def setup_target_training(args):
    """Device, data, a fresh target model, SGD with MultiStepLR, and loaders (stages 1 and 3).

    The training loader shuffles and augments with its own seeded generator, whose state
    last.pth keeps so a resumed run sees the same batches. Under torchrun, --batch-size is the
    global batch: each process takes its shard of every batch."""
    from types import SimpleNamespace

    from models import get_model
    from utils.data import load_splits

    writable_dir(args.model_dir, "--model-dir")  # before loading anything
    device = prepare_device(args)
    seed_everything(args.seed)
    splits, info = load_splits(args.dataset, args.data_dir, train_limit=args.train_limit,
                               test_limit=args.test_limit, val_size=args.val_size, seed=args.seed)
    # The default hold-out depends on the training split's size: config.json records the count.
    args.val_size = 0 if splits["val"] is None else len(splits["val"])
    net = get_model(args.arch, num_classes=info.num_classes, in_channels=info.in_channels).to(device)
    model = speed_up(net, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_milestones, gamma=args.lr_gamma)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader, eval_loader = training_loaders(args, splits, info, device, generator)
    return SimpleNamespace(device=device, info=info, net=bare_module(model), model=model, optimizer=optimizer,
                           scheduler=scheduler, generator=generator, train_loader=train_loader,
                           eval_loader=eval_loader)
