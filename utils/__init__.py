"""The library behind the five scripts, one concern per place.

- ``namid``: the front door. NAMID's and WMIM's losses for any training loop.
- ``attacks/``: every attack behind one registry, with one PGD loop for every norm and loss.
- ``mi/``: the method's MI side. Bounds, the estimators and their files, the estimator
  objectives, the natural/adversarial pattern split and sample selection, and the release's numerics.
- ``training/``: how a stage runs. The epoch loop, the run folder, setup, checkpoints, devices,
  torchrun, the losses, stage 3's gradient balance and the plumbing of stage 2.
- ``evaluation/``: what test_comparison.py and run_pipeline.py compute and write. The engine, its
  trust checks, the results, the tables, the JSON and report.md.
- ``data/``: the datasets in memory, the files they are read from, seeded subsets and synthetic data.
- ``cli``: the flags several scripts share, and how they are parsed.
- ``script``: how a script ends (one-line errors, exit statuses).
- ``plots``: every figure, written atomically.
- ``host_syncs``: counting host-device synchronisations, for tests and benchmarks.

Only the scripts (and ``cli``) read flags; library code takes values and small typed records."""
