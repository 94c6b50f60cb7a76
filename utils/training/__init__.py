"""How a training stage runs (PAPER.md §2, §5, §6).

Two layers. The lower one imports nothing else of ``utils/`` but ``script`` and ``attacks.base``,
so every package may use it:

- ``distributed``: torchrun, one process per GPU (or CPU worker).
- ``checkpoint``: atomic writes and checkpoints loaded with ``weights_only=True``.
- ``device``: devices, seeds and random-number state.
- ``fast``: the fast path (amp, channels_last, torch.compile) and the one batch loop over a loader.
- ``losses``: Standard AT, TRADES and MART.
- ``balance``: stage 3's gradient balance, its cap and the collapse guard.

The upper one builds a stage from ``utils.data``, ``utils.mi`` and ``utils.attacks``:

- ``loop``: the epoch loop of every stage, its meters and its accuracies.
- ``run``: a run's folder (config.json, metrics.jsonl, curves.png, best files, last.pth) and resume.
- ``setup``: what a stage sets up before its first epoch.
- ``stage2``: what the two estimator scripts share.

Nothing here imports ``utils.evaluation`` or reads flags: the scripts turn their flags into the
records these functions take (``DataSpec``, ``FastPath``, ``TrainAttack``, ...) through ``utils.cli``."""
