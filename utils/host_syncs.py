"""Counting the points where the host waits for the device, on any device (CPU included).

On a GPU the Python thread runs ahead of the kernels it queues; a value read back (``.item()``,
``float(t)``, ``if t:``), a copy to the host, or an output whose shape depends on the data
(``nonzero``, boolean-mask indexing) makes it wait until the queue has drained. A training step
that does so leaves the GPU idle while the host catches up. ``HostSyncs`` counts these calls
through ``__torch_function__``, so a CPU test can hold a loop to a budget: the same code issues
the same calls on every device.

    with HostSyncs() as syncs:
        for x, y in syncs.per_batch(loader, "train"):
            step(x, y)
    syncs.batches["train"]  # one Counter of call names per batch, the fetching of batches excluded

What it cannot see: syncs inside a C++ kernel or inside a Python torch function it intercepts as
a whole (it sees ``F.interpolate``, not what runs in it), and tensors made from host data on a
CPU-only run cost no copy there (they are counted all the same, as ``tensor``)."""
from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch.overrides import TorchFunctionMode

# Read a value back to the host (or copy a tensor there).
_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__array__: "numpy",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
    torch.Tensor.__complex__: "complex",
    torch.Tensor.__format__: "format",
    torch.Tensor.is_nonzero: "bool",
    torch.is_nonzero: "bool",
    torch.equal: "equal",
    torch.allclose: "allclose",
}
# Outputs whose shape depends on the values: the host must learn the size before allocating.
_SHAPES = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    torch.Tensor.argwhere: "nonzero",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique",
    torch.Tensor.unique_consecutive: "unique",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
}
# Tensors built from host data (a host-to-device copy when the device is a GPU).
_FROM_HOST = {torch.tensor: "tensor", torch.as_tensor: "tensor", torch.Tensor.new_tensor: "tensor"}
_INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put,
             torch.Tensor.index_put_, torch.index_put)


def _has_mask(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_has_mask(i) for i in index)
    return False


def sync_kind(func, args, kwargs) -> Optional[str]:
    """The kind of host sync a call of ``func`` makes, or None."""
    kind = _READS.get(func) or _SHAPES.get(func)
    if kind:
        return kind
    if func in _FROM_HOST:
        data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else kwargs.get("data"))
        return None if isinstance(data, torch.Tensor) else _FROM_HOST[func]
    if func in _INDEXING:
        return "mask_index" if len(args) > 1 and _has_mask(args[1]) else None
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "nonzero"  # where(condition) is nonzero(condition, as_tuple=True)
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
        return "repeat_interleave" if isinstance(repeats, torch.Tensor) else None
    if func is torch.Tensor.to:
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        if target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
            return "cpu"
    return None


class HostSyncs(TorchFunctionMode):
    """Counts host syncs (``sync_kind``) while active: ``calls`` over the whole block, and per
    batch of each loop wrapped by ``per_batch`` (or ``tqdm``, its drop-in for the project's loops)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.batches: Dict[str, List[Counter]] = {}
        self._paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            kind = sync_kind(func, args, kwargs)
            if kind:
                self.calls[kind] += 1
        return func(*args, **kwargs)

    @contextmanager
    def paused(self):
        """Nothing in the block is counted (e.g. host-side bookkeeping that is no sync on any device)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def per_batch(self, iterable: Iterable, label: str) -> Iterator:
        """``iterable``'s items; what runs between receiving one and asking for the next (the loop's
        body) is counted into ``batches[label]``, one Counter per batch. Fetching is not counted."""
        record = self.batches.setdefault(str(label), [])
        items = iter(iterable)
        while True:
            with self.paused():
                try:
                    item = next(items)
                except StopIteration:
                    return
            before = Counter(self.calls)
            yield item
            record.append(self.calls - before)

    def tqdm(self, iterable: Iterable, desc: Optional[str] = None, **_) -> Iterator:
        """Stands in for ``tqdm.tqdm`` in a module under test: its loops are counted per batch by ``desc``."""
        return self.per_batch(iterable, desc)
