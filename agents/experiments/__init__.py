"""Comparisons, sweeps and throughput measurements, importable from the installed package."""
