"""Thin wrapper: `python benchmarks/throughput.py ...` runs :mod:`agents.experiments.throughput`."""

from agents.experiments.throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
