"""Datasets in memory (PAPER.md §8).

- ``splits``: the in-memory :class:`Split`, :class:`DatasetInfo` and :class:`DataError`.
- ``files``: the datasets read from disk (CIFAR, SVHN, MNIST/Fashion-MNIST idx, Tiny-ImageNet, .npy).
- ``loaders``: the registry of datasets, seeded subsets and held-out splits, and the batch loader.
- ``synthetic``: seeded class-conditional images that need no files.

Imports nothing else of ``utils/``: every other package may depend on it."""
