"""Per-seed checks of SequenceMatch on the small dyck grammar against its exact target.

    python benchmarks/dyck_small_acceptance.py [--results benchmarks/results/dyck_small]
        [--kappa benchmarks/results/dyck_small_kappa] [--out .../acceptance.md]

Reads the ``results.json`` of ``seqmatch compare --config dyck_small_cpu`` (and of its kappa = 0.25
negative control) and writes ``acceptance.md``: every run's exact figures per seed (with the
SequenceMatch warm start's own), the share of the gradient that came from SequenceMatch, and each
bound of the temperature work (docs/method.md §2-§5) answered per seed. A bound holds when it holds
on every seed. Floors (what the target itself scores) are printed beside the output metrics: on
clean texts the target, the expert marginalised over the disturbance, sits at an output TV of
about 0.026 at the training discount, so the clean reading of the 0.03 bound leaves little room.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agents.outputs import check_file, write_file

BOUNDS: dict[str, float] = {
    "exact_target_chi2": 0.01,  # chi^2-mixture to the target, gamma 0.9
    "exact_target_live_chi2": 0.01,  # the same on live pairs, gamma 0.998
    "exact_invalid": 0.005,  # invalid mass of the final texts, clean MDP
    "exact_output_tv": 0.03,  # TV of the final texts to the grammar's, clean MDP
    "exact_output_tv_disturbed": 0.03,  # the same in the disturbed MDP (the target's own: ~0)
}
MIN_GRAD_SHARE = 0.25  # of L_SM over the SequenceMatch phase, at the default eta
BACKSPACE_SLACK = 0.02  # |backspace rate - the expert's| in the disturbed MDP: no runaway
COLUMNS = (
    *BOUNDS,
    "exact_clean_chi2",
    "exact_invalid_disturbed",
    "exact_backspace_rate",
)

Run = dict[str, Any]


def grad_share(run: Run, key: str = "train/grad_share_sm") -> tuple[float, float] | None:
    """(mean, lowest) of a gradient share over the run's logged rows; None if never logged."""
    values = [row[key] for row in run.get("curves", []) if key in row]
    return (sum(values) / len(values), min(values)) if values else None


def expert_backspace_rate(run: Run) -> float:
    """The (non-Markov) expert's exact backspace rate in the disturbed MDP."""
    return float(run["exact"]["g0.9/expert/backspace_rate"])


def per_seed_table(results: dict[str, Any]) -> list[str]:
    """Markdown rows of every run's exact figures, its warm start's beneath it, and its shares.

    The comparison's runs come first, then its sweep's, labelled with the swept value.
    """
    sweep = results.get("sweep") or {}
    param = sweep.get("param")
    labelled = [(run, run["agent"]) for run in results["runs"]]
    labelled += [(run, f"{run['agent']} {param}={run[param]}") for run in sweep.get("runs", [])]
    head = [
        "run",
        "seed",
        *(c.replace("exact_", "") for c in COLUMNS),
        "grad share SM (mean; lowest)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, label in labelled:
        share = grad_share(run)
        share_text = f"{share[0]:.3f}; {share[1]:.3f}" if share else "–"
        cells = [f"{run['metrics'].get(c, math.nan):.4f}" for c in COLUMNS]
        lines.append(f"| {label} | {run['seed']} | {' | '.join(cells)} | {share_text} |")
        if run.get("warm_start"):
            warm = [f"{run['warm_start'].get(c, math.nan):.4f}" for c in COLUMNS]
            lines.append(f"|   warm start | {run['seed']} | {' | '.join(warm)} | |")
    return lines


def check(text: str, values: Sequence[float], holds: Callable[[float], bool]) -> str:
    """One bound answered on every seed: met only when each seed's value holds."""
    if not values:
        return f"- {text}: **not measured** (no runs)."
    verdict = "met" if all(holds(v) for v in values) else "not met"
    per_seed = ", ".join(f"{v:.4f}" for v in values)
    return f"- {text}: **{verdict}** (per seed {per_seed})."


def at_most(bound: float) -> Callable[[float], bool]:
    """The test ``value <= bound``."""
    return lambda value: value <= bound


def bound_lines(name: str, runs: Sequence[Run]) -> list[str]:
    """Each of BOUNDS answered per seed for one group of SequenceMatch runs."""
    lines = []
    for metric, bound in BOUNDS.items():
        values = [float(r["metrics"][metric]) for r in runs]
        lines.append(check(f"{name}: {metric} <= {bound}", values, at_most(bound)))
    return lines


def sequencematch_by_eta(results: dict[str, Any]) -> dict[float, list[Run]]:
    """The comparison's SequenceMatch runs grouped by eta: its own, then its eta sweep's."""
    groups: dict[float, list[Run]] = {}
    default = float(results["config"]["train"]["eta"])
    sweep = results.get("sweep") or {}
    runs = [*results["runs"], *(sweep.get("runs", []) if sweep.get("param") == "eta" else [])]
    for run in runs:
        if run["agent"] == "sequencematch":
            groups.setdefault(float(run.get("eta", default)), []).append(run)
    return groups


def acceptance(results: dict[str, Any], kappa: dict[str, Any] | None) -> str:
    """The acceptance page of a dyck_small comparison (and of its kappa control)."""
    eta = float(results["config"]["train"]["eta"])
    by_eta = sequencematch_by_eta(results)
    first = results["runs"][0]["exact"]
    out = [
        "# dyck_small: SequenceMatch against its exact target, per seed",
        "",
        f"Written by `python benchmarks/dyck_small_acceptance.py` from `{results['command']}`.",
        f"Default eta of this comparison: {eta}. A bound is met when it holds on every seed.",
        "",
        "Floors (the target, the expert marginalised over the disturbance, scored the same way): "
        f"output TV clean {first['g0.9/floor/output_tv']:.4f} at gamma 0.9 and "
        f"{first['g0.998/floor/output_tv']:.4f} at 0.998 (the training discount); in the disturbed "
        f"MDP the expert's own output TV is {first['g0.9/expert/output_tv']:.4f}; clean chi^2 "
        f"floor {first['g0.9/floor/chi2_mixture']:.4f}; the expert's backspace rate "
        f"{expert_backspace_rate(results['runs'][0]):.4f}.",
        "",
        "## Bounds",
        "",
    ]
    for value, runs in sorted(by_eta.items()):
        out += bound_lines(f"SequenceMatch, eta {value}", runs)
    if 1.0 in by_eta:
        kept = [
            r["metrics"]["exact_target_chi2"] - r["warm_start"]["exact_target_chi2"]
            for r in by_eta[1.0]
        ]
        text = "eta 1.0: the SequenceMatch phase keeps or improves the warm start's target chi^2"
        out.append(check(text + " (change per seed)", kept, lambda v: v <= 0))
    shares = [(grad_share(r) or (math.nan, math.nan))[0] for r in by_eta.get(eta, [])]
    text = (
        f"gradient share of L_SM over the SequenceMatch phase >= {MIN_GRAD_SHARE} at the "
        f"default eta {eta} (the mean of each seed's logged shares)"
    )
    out.append(check(text, shares, lambda v: v >= MIN_GRAD_SHARE))
    for value, runs in sorted(by_eta.items()):
        gaps = [abs(r["metrics"]["exact_backspace_rate"] - expert_backspace_rate(r)) for r in runs]
        text = (
            f"no runaway at eta {value}: |backspace rate - the expert's| <= {BACKSPACE_SLACK} "
            "(exact, disturbed MDP)"
        )
        out.append(check(text, gaps, lambda v: v <= BACKSPACE_SLACK))
    if kappa is not None:
        out += ["", "Negative control at kappa = 0.25 (it should fail):", ""]
        for value, runs in sorted(sequencematch_by_eta(kappa).items()):
            out += bound_lines(f"kappa 0.25, eta {value}", runs)
    out += ["", "## Per seed", "", *per_seed_table(results)]
    if kappa is not None:
        out += ["", "Negative control (kappa = 0.25):", "", *per_seed_table(kappa)]
    return "\n".join(out) + "\n"


def read_results(folder: Path, option: str) -> dict[str, Any]:
    """A comparison folder's results.json; SystemExit (one line) when there is none."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{option} {folder}: no results.json there (run its comparison first)")
    return json.loads(path.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """Write acceptance.md beside the comparison's results.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="benchmarks/results/dyck_small")
    parser.add_argument(
        "--kappa",
        default="benchmarks/results/dyck_small_kappa",
        help="the kappa = 0.25 control's comparison folder; '' leaves the control out",
    )
    parser.add_argument("--out", default=None, help="default: RESULTS/acceptance.md")
    options = parser.parse_args(argv)
    out = Path(options.out) if options.out else Path(options.results) / "acceptance.md"
    inputs = [("--results", Path(options.results) / "results.json")]
    if options.kappa:
        inputs.append(("--kappa", Path(options.kappa) / "results.json"))
    check_file(out, "--out", inputs)  # before reading: a bad --out fails first, in one line
    results = read_results(Path(options.results), "--results")
    kappa = read_results(Path(options.kappa), "--kappa") if options.kappa else None
    write_file(out, acceptance(results, kappa))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
