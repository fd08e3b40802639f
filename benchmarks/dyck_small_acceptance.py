"""Thin wrapper: `python benchmarks/dyck_small_acceptance.py` runs agents.experiments.dyck_small."""

from agents.experiments.dyck_small import main

if __name__ == "__main__":
    raise SystemExit(main())
