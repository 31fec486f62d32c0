"""Benchmarks (run as modules, e.g. ``python -m diffquant.bench.accuquant_memory``)."""
