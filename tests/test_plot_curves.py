"""experiments/plot_curves.py on a small synthetic results folder (the layout aggregate_*.py commits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from experiments import plot_curves
from prior.eval.compare import Protocol

STEPS = (100, 200, 300)


def _run(folder: Path, color: float, seed: int) -> None:
    """One run's eval curve: counter-prior colour choice rising to ``color`` (+ seed offset)."""
    folder.mkdir(parents=True)
    rows = []
    for i, step in enumerate(STEPS, 1):
        value = color * i / len(STEPS) + 0.01 * seed
        rows.append({"step": step, "split": "test_counter", "choice_accuracy_color": value,
                     "prior_pick_rate": 1 - value, "nll_color_counter": 3 - value, "nll_function": 0.1})
        rows.append({"step": step, "split": "test", "choice_accuracy_count": value, "bleu4": value / 2})
    (folder / "eval_curve.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def results(tmp_path: Path) -> Path:
    runs = tmp_path / "weighting" / "runs"
    for seed in (0, 1):
        _run(runs / "u" / f"ntp_lr1e-3_s{seed}", 0.6, seed)
        _run(runs / "u" / f"prior_lr3e-3_s{seed}", 0.5, seed)
        _run(runs / "u" / f"prior_floor0.1_lr3e-3_s{seed}", 0.9, seed)
    _run(runs / "u" / "prior_lr1e-3_s0", 0.0, 0)  # a rate the sweep did not choose: must be left out
    _run(runs / "u" / "prior_lr3e-3_s5_partial", 0.0, 0)  # not a run folder name
    (runs / "selection.json").write_text(json.dumps(
        {"selected_lr": {"u/ntp": "1e-3", "u/prior": "3e-3", "u/prior_floor0.1": "3e-3"}}))
    return tmp_path / "weighting"


def test_each_scheme_is_drawn_at_its_chosen_rate_with_every_seed(results):
    groups = plot_curves.load_groups(results, "u", plot_curves.DEFAULT_SCHEMES)
    assert {s: (lr, len(curves)) for s, (lr, curves) in groups.items()} == {
        "ntp": ("1e-3", 2), "prior": ("3e-3", 2), "prior_floor0.1": ("3e-3", 2)}
    finals = [c["test_counter/choice_accuracy_color"][-1][1] for c in groups["prior"][1]]
    assert finals == pytest.approx([0.5, 0.51])  # seeds 0 and 1 at 3e-3, not the 1e-3 run (0.0)


def test_the_png_is_written_small_with_the_gate_in_its_title(results, monkeypatch):
    titles = []
    real_plot = plot_curves.plot
    monkeypatch.setattr(plot_curves, "plot", lambda *a: titles.append(a[3]) or real_plot(*a))
    path = plot_curves.main([str(results)])
    assert path == results / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < path.stat().st_size < 150_000
    with Image.open(path) as png:
        assert png.width > 900 and png.height > 400  # three columns, two rows of panels at dpi 110
    assert "mean ± std over 2 seeds" in titles[0] and "INVALID" not in titles[0]  # NTP ends at 0.6 >= gate

    _run(results / "runs" / "h" / "ntp_lr1e-3_s0", 0.1, 0)  # NTP below the gate: the title says so
    (results / "runs" / "selection.json").write_text(json.dumps({"selected_lr": {"h/ntp": "1e-3"}}))
    plot_curves.main([str(results), "--setting", "h", "--out", str(results / "h.png")])
    assert "INVALID under the validity gate" in titles[1] and (results / "h.png").exists()


def test_default_metrics_are_pre_registered_and_bad_folders_say_what_to_do(tmp_path, results):
    protocol = Protocol.load("demo")
    assert set(plot_curves.DEFAULT_METRICS) <= {*protocol.likelihood, *protocol.generation, *protocol.nll}
    with pytest.raises(SystemExit, match="runs/selection.json"):
        plot_curves.main([str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="No runs of"):
        plot_curves.load_groups(results, "h", ["ntp"])
