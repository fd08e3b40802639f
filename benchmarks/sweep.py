"""Thin wrapper: `python benchmarks/sweep.py ...` runs :mod:`agents.experiments.sweep`."""

from agents.experiments.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
