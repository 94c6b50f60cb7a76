# Keep pytest from collecting the top-level evaluation script as a test module.
collect_ignore = ["test_comparison.py"]
