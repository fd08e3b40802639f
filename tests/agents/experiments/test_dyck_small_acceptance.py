"""The per-seed acceptance page of the small dyck comparison (agents.experiments.dyck_small)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agents.experiments.dyck_small import acceptance, grad_share, main

GOOD = {
    "exact_target_chi2": 0.002,
    "exact_target_live_chi2": 0.003,
    "exact_invalid": 0.002,
    "exact_output_tv": 0.02,
    "exact_output_tv_disturbed": 0.01,
    "exact_clean_chi2": 0.005,
    "exact_invalid_disturbed": 0.003,
    "exact_backspace_rate": 0.068,
}
EXACT = {
    "g0.9/floor/output_tv": 0.0217,
    "g0.998/floor/output_tv": 0.0262,
    "g0.9/expert/output_tv": 0.0,
    "g0.9/floor/chi2_mixture": 0.0026,
    "g0.9/expert/backspace_rate": 0.0666,
}


def run(agent: str, seed: int, share: float | None = 0.3, **metrics: float) -> dict[str, Any]:
    curves = [{"step": 100, "losses/loss": 1.0}]
    if share is not None:
        curves += [
            {"step": 500, "train/grad_share_sm": share - 0.05},
            {"step": 800, "train/grad_share_sm": share + 0.05},
        ]
    return {
        "agent": agent,
        "seed": seed,
        "metrics": {**GOOD, **metrics},
        "exact": EXACT,
        "warm_start": {**GOOD, "exact_target_chi2": 0.004} if agent == "sequencematch" else {},
        "curves": curves,
    }


def results(
    runs: list[dict[str, Any]], sweep: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "command": "seqmatch compare",
        "config": {"train": {"eta": 0.3}},
        "runs": runs,
    }
    if sweep:
        out["sweep"] = {"param": "eta", "runs": sweep}
    return out


def bound_line(page: str, start: str) -> str:
    (line,) = [line for line in page.splitlines() if line.startswith(f"- {start}")]
    return line


def test_grad_share_is_the_mean_and_lowest_of_the_logged_rows() -> None:
    assert grad_share(run("sequencematch", 0, share=0.3)) == (0.3, 0.25)
    assert grad_share(run("bc", 0, share=None)) is None


def test_a_bound_is_met_only_when_every_seed_meets_it() -> None:
    runs = [
        run("bc", 0, share=None),
        run("sequencematch", 0),
        run("sequencematch", 1, exact_output_tv=0.031),
    ]
    page = acceptance(results(runs), None)
    assert "**not met** (per seed 0.0200, 0.0310)" in bound_line(
        page, "SequenceMatch, eta 0.3: exact_output_tv <="
    )
    assert "**met**" in bound_line(page, "SequenceMatch, eta 0.3: exact_invalid <=")
    assert "**met** (per seed 0.3000, 0.3000)" in bound_line(page, "gradient share")
    # the floors are printed for the reader: the target's own clean output TV
    assert "0.0262 at 0.998" in page


def test_low_gradient_share_runaway_and_a_worse_eta_1_phase_fail() -> None:
    runs = [run("sequencematch", 0, share=0.1)]
    sweep = [
        {**run("sequencematch", 0, exact_backspace_rate=0.2, exact_target_chi2=0.005), "eta": 1.0}
    ]
    page = acceptance(results(runs, sweep), None)
    assert "**not met**" in bound_line(page, "gradient share")
    assert "**not met**" in bound_line(page, "no runaway at eta 1.0")
    assert "**met**" in bound_line(page, "no runaway at eta 0.3")
    assert "**not met** (per seed 0.0010)" in bound_line(
        page, "eta 1.0: the SequenceMatch phase keeps"
    )


def test_main_writes_the_page_with_the_negative_control(tmp_path: Path) -> None:
    main_dir, kappa_dir = tmp_path / "dyck_small", tmp_path / "kappa"
    main_dir.mkdir()
    kappa_dir.mkdir()
    (main_dir / "results.json").write_text(json.dumps(results([run("sequencematch", 0)])))
    control = results([run("sequencematch", 0, exact_invalid=0.3)])
    (kappa_dir / "results.json").write_text(json.dumps(control))
    assert main(["--results", str(main_dir), "--kappa", str(kappa_dir)]) == 0
    page = (main_dir / "acceptance.md").read_text()
    assert "**not met** (per seed 0.3000)" in bound_line(page, "kappa 0.25, eta 0.3: exact_invalid")


def test_a_missing_control_folder_is_refused_unless_left_out(tmp_path: Path) -> None:
    main_dir = tmp_path / "dyck_small"
    main_dir.mkdir()
    (main_dir / "results.json").write_text(json.dumps(results([run("sequencematch", 0)])))
    with pytest.raises(SystemExit, match=r"--kappa .*nowhere: no results\.json"):
        main(["--results", str(main_dir), "--kappa", str(tmp_path / "nowhere")])
    assert main(["--results", str(main_dir), "--kappa", ""]) == 0
    assert "Negative control" not in (main_dir / "acceptance.md").read_text()


def test_out_is_checked_before_reading_and_never_an_input(tmp_path: Path) -> None:
    """--out follows the output rule: a folder there or the comparison's own results.json is
    refused in one line before anything is read, and a file is replaced whole."""
    main_dir = tmp_path / "dyck_small"
    main_dir.mkdir()
    data = json.dumps(results([run("sequencematch", 0)]))
    (main_dir / "results.json").write_text(data)
    with pytest.raises(IsADirectoryError, match=r"--out .*a folder is there"):
        main(["--results", str(main_dir), "--kappa", "", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"this run's input \(--results"):
        main(["--results", str(main_dir), "--kappa", "", "--out", str(main_dir / "results.json")])
    assert (main_dir / "results.json").read_text() == data
    page = tmp_path / "page.md"
    page.write_text("my earlier page")
    page.chmod(0o640)
    assert main(["--results", str(main_dir), "--kappa", "", "--out", str(page)]) == 0
    assert "my earlier page" not in page.read_text() and page.stat().st_mode & 0o777 == 0o640
