"""Thin wrapper: `python benchmarks/regime.py ...` runs :mod:`agents.experiments.regime`."""

from agents.experiments.regime import main

if __name__ == "__main__":
    raise SystemExit(main())
