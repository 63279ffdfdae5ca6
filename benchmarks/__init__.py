"""Benchmarks of jaxalign (run as scripts: `python benchmarks/train_step.py`)."""
