"""What test_comparison.py and run_pipeline.py compute and write (PAPER.md §7).

- ``engine``: every attack over the same examples in the same batches, for every model.
- ``checks``: trust checks in the spirit of AutoAttack's ``checks.py``.
- ``results``: per-model results, per-example robust masks and the warnings.
- ``output``: Markdown tables, the JSON and the accuracy-against-ε plot.
- ``report``: report.md and results.md of run_pipeline.py.
- ``markdown``: the one Markdown-table writer.

May import ``utils.attacks``, ``utils.data``, ``utils.plots`` and the lower layer of
``utils.training``; never the epoch loop."""
