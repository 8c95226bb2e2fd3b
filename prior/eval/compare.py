"""PRIOR against NTP: learning curves of training runs, summarised, tabulated and plotted.

A run folder holds ``eval_curve.jsonl`` (written by ``prior.eval.callback.PeriodicEval``): one
line per evaluation, ``{"step", "split", <metric>: value, ...}``. Runs are grouped by a label
(e.g. ``ntp`` / ``prior``, or ``encoder_free/prior``), seeds within a group are averaged, and
each metric ``<split>/<metric>`` is summarised by its value at the last step, the area under its
curve (its mean level over training: PRIOR's gain is largest while grounding is learned), the
steps to reach a threshold and the slope of a power-law fit against steps (scaling coefficient).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prior.eval.metrics import (
    METRIC_DIRECTIONS,
    area_under_curve,
    higher_is_better,
    power_law_fit,
    relative_improvement,
)

CURVE_FILE = "eval_curve.jsonl"

#: The metrics the demo and the experiment report, in this order.
KEY_METRICS: tuple[str, ...] = (
    "test_counter/choice_accuracy_color",
    "test_counter/choice_accuracy",
    "test_counter/prior_pick_rate",
    "test/choice_accuracy",
    "test_counter/chair_i",
    "test_counter/color_hallucination",
    "test_counter/missing_object_rate",
    "test_counter/color_precision",
    "test/bleu4",
    "test/rouge_l",
    "test/perplexity",
)

#: Metrics without an upper bound: their change is shown but not averaged.
UNBOUNDED: frozenset[str] = frozenset({"perplexity", "nll"})

Curve = dict[str, list[tuple[int, float]]]  # "split/metric" -> [(step, value)]


def change(metric: str, ntp: float, prior: float) -> float:
    """PRIOR's relative change over NTP, positive when PRIOR is better.

    Rates where lower is better (hallucination, prior picks, missing objects) compare as
    ``1 - rate`` (the share done right), so a change is bounded like an accuracy's; unbounded
    metrics (perplexity) compare as they are.
    """
    base = metric.rsplit("/", 1)[-1]
    if base in UNBOUNDED or higher_is_better(metric):
        return relative_improvement(ntp, prior, higher_is_better(metric))
    return relative_improvement(1.0 - ntp, 1.0 - prior)


def load_curve(run_dir: str | Path) -> Curve:
    """The learning curves of one run, sorted by step."""
    path = Path(run_dir) / CURVE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: was the run trained with the PeriodicEval callback?")
    curve: Curve = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key in ("step", "split") or not isinstance(value, (int, float)):
                continue
            curve[f"{row['split']}/{key}"].append((int(row["step"]), float(value)))
    return {k: sorted(v) for k, v in curve.items()}


def mean_curve(curves: Sequence[Curve], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds at the steps every run evaluated."""
    per_run = [dict(c[metric]) for c in curves if metric in c]
    if not per_run:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    values = np.array([[r[s] for s in steps] for r in per_run], dtype=float)
    return np.array(steps), values.mean(0), values.std(0)


@dataclass
class Summary:
    """One metric of one group of runs: mean and std over seeds of each statistic."""

    final: tuple[float, float]
    auc: tuple[float, float]
    slope: tuple[float, float]
    seeds: int


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if math.isfinite(v)], dtype=float)
    return (float(arr.mean()), float(arr.std())) if arr.size else (math.nan, math.nan)


def _slope(points: Sequence[tuple[int, float]]) -> float:
    try:
        return power_law_fit([s for s, _ in points], [v for _, v in points])[1]
    except ValueError:
        return math.nan


def summarize(curves: Sequence[Curve], metric: str) -> Summary:
    """Final value, area under the curve and power-law slope of ``metric`` over seeds."""
    runs = [c[metric] for c in curves if metric in c and c[metric]]
    finals = [pts[-1][1] for pts in runs]
    aucs = [area_under_curve([s for s, _ in pts], [v for _, v in pts]) for pts in runs]
    slopes = [_slope(pts) for pts in runs]
    return Summary(_mean_std(finals), _mean_std(aucs), _mean_std(slopes), len(runs))


def comparison_table(
    ntp: Sequence[Curve], prior: Sequence[Curve], metrics: Sequence[str] = KEY_METRICS
) -> tuple[str, dict[str, float]]:
    """A markdown table of NTP vs PRIOR per metric (final and area under the curve, mean +- std
    over seeds, relative change as the paper reports it, see ``change``) and the average relative
    changes over the bounded metrics."""
    rows = [
        "| metric | better | NTP final | PRIOR final | change | NTP AUC | PRIOR AUC | change | slope NTP | slope PRIOR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gains: dict[str, list[float]] = {"final": [], "auc": []}
    for metric in metrics:
        a, b = summarize(ntp, metric), summarize(prior, metric)
        if not a.seeds or not b.seeds:
            continue
        up = higher_is_better(metric)
        final_gain = change(metric, a.final[0], b.final[0])
        auc_gain = change(metric, a.auc[0], b.auc[0])
        if metric.rsplit("/", 1)[-1] not in UNBOUNDED:
            gains["final"].append(final_gain)
            gains["auc"].append(auc_gain)
        rows.append(
            f"| {metric} | {'higher' if up else 'lower'} | {_fmt(a.final, a.seeds)} | {_fmt(b.final, b.seeds)} | "
            f"{_pct(final_gain)} | {_fmt(a.auc, a.seeds)} | {_fmt(b.auc, b.seeds)} | {_pct(auc_gain)} | "
            f"{_fmt(a.slope, a.seeds)} | {_fmt(b.slope, b.seeds)} |"
        )
    averages = {k: _nanmean(v) for k, v in gains.items()}
    rows.append(
        f"| **average relative change** (bounded metrics) | | | | **{_pct(averages['final'])}** | | | "
        f"**{_pct(averages['auc'])}** | | |"
    )
    return "\n".join(rows), averages


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _fmt(stat: tuple[float, float], seeds: int) -> str:
    mean, std = stat
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.1%}"


def _pyplot():  # noqa: ANN202
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:  # noqa: ANN001
    """Write a figure as PNG (making the folder) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_curves(
    groups: Mapping[str, Sequence[Curve]], metrics: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """One panel per metric: mean over seeds (band = std) of each group against training steps."""
    plt = _pyplot()
    metrics = [m for m in metrics if any(m in c for curves in groups.values() for c in curves)]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for label, curves in groups.items():
            steps, mean, std = mean_curve(curves, metric)
            if steps.size:
                ax.plot(steps, mean, marker="o", ms=3, label=label)
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        arrow = "↑" if METRIC_DIRECTIONS.get(metric.rsplit("/", 1)[-1], True) else "↓"
        ax.set_title(f"{metric} {arrow}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if any(ax.get_legend_handles_labels()[0] for ax in axes.flat):
        axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_scaling(groups: Mapping[str, Sequence[Curve]], metric: str, path: str | Path) -> Path:
    """Log-log plot of ``metric`` against steps with each group's power-law fit and its slope."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, curves in groups.items():
        steps, mean, _ = mean_curve(curves, metric)
        keep = (steps > 0) & (mean > 0)
        if keep.sum() < 2:
            continue
        a, b, r2 = power_law_fit(steps[keep], mean[keep])
        (line,) = ax.plot(steps[keep], mean[keep], "o", label=f"{label}: slope {b:.3f} (r² {r2:.2f})")
        xs = np.geomspace(steps[keep].min(), steps[keep].max(), 50)
        ax.plot(xs, a * xs**b, "-", color=line.get_color(), alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title(f"scaling: {metric}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
