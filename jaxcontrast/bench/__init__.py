"""Benchmarks of the train step (`python -m jaxcontrast.bench`): timing, FLOPs, memory, and a
PyTorch reference step. Not imported by the library."""
