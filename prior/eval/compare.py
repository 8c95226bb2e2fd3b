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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prior.eval.metrics import (
    METRIC_DIRECTIONS,
    area_under_curve,
    higher_is_better,
    power_law_fit,
    relative_improvement,
    steps_to_threshold,
)

CURVE_FILE = "eval_curve.jsonl"

#: Metrics without an upper bound: their change is shown but not averaged.
UNBOUNDED: frozenset[str] = frozenset({"perplexity", "nll"})


@dataclass(frozen=True)
class Protocol:
    """A pre-registered evaluation protocol (``conf/protocol/*.yaml``): which metrics are averaged
    in which table, the thresholds for steps-to-threshold, the metrics whose error is fitted for
    scaling, the validity gate and the learning-rate selection metric."""

    likelihood: tuple[str, ...]
    generation: tuple[str, ...] = ()
    nll: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    scaling: tuple[str, ...] = ()
    gate: Mapping[str, Any] | None = None
    selection: Mapping[str, Any] | None = None

    @classmethod
    def load(cls, name_or_path: str | Path = "demo") -> Protocol:
        """A protocol by name (``conf/protocol/<name>.yaml``) or yaml path."""
        from omegaconf import OmegaConf

        from prior.cli._hydra import CONF_DIR

        path = Path(name_or_path)
        if not path.suffix:
            path = Path(CONF_DIR) / "protocol" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"No protocol at {path}: name one in conf/protocol/ or give a yaml path.")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        return cls(
            likelihood=tuple(data["likelihood"]),
            generation=tuple(data.get("generation") or ()),
            nll=tuple(data.get("nll") or ()),
            thresholds=dict(data.get("thresholds") or {}),
            scaling=tuple(data.get("scaling") or ()),
            gate=data.get("gate"),
            selection=data.get("selection"),
        )

    def passes_gate(self, curves: Sequence[Curve]) -> tuple[bool, float]:
        """Whether the mean over runs of the gate metric at the last step reaches its ``min``."""
        if not self.gate:
            return True, math.nan
        value = summarize(curves, self.gate["metric"]).final[0]
        return bool(math.isfinite(value) and value >= float(self.gate["min"])), value


Curve = dict[str, list[tuple[int, float]]]  # "split/metric" -> [(step, value)]


def change(metric: str, ntp: float, prior: float) -> float:
    """PRIOR's relative change over NTP, positive when PRIOR is better.

    Rates where lower is better (hallucination, prior picks, missing objects) compare as
    ``1 - rate`` (the share done right), so a change is bounded like an accuracy's; unbounded
    metrics (perplexity) compare as they are.
    """
    if _unbounded(metric) or higher_is_better(metric):
        return relative_improvement(ntp, prior, higher_is_better(metric))
    return relative_improvement(1.0 - ntp, 1.0 - prior)


def _unbounded(metric: str) -> bool:
    """Perplexity, NLL and per-kind NLL (``nll_<kind>``) have no upper bound."""
    return metric.rsplit("/", 1)[-1].split("_")[0] in UNBOUNDED


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
    """One metric of one group of runs: mean and std over seeds of each statistic.

    ``error_slope`` is the power-law exponent of the error (1 - value for a higher-is-better
    metric, the value itself otherwise) against steps: more negative = the error falls faster.
    """

    final: tuple[float, float]
    auc: tuple[float, float]
    error_slope: tuple[float, float]
    seeds: int


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if math.isfinite(v)], dtype=float)
    return (float(arr.mean()), float(arr.std())) if arr.size else (math.nan, math.nan)


def _error_slope(metric: str, points: Sequence[tuple[int, float]]) -> float:
    up = METRIC_DIRECTIONS.get(metric.rsplit("/", 1)[-1], True)
    try:
        return power_law_fit([s for s, _ in points], [1.0 - v if up else v for _, v in points])[1]
    except ValueError:
        return math.nan


def summarize(curves: Sequence[Curve], metric: str) -> Summary:
    """Final value, area under the curve and error slope of ``metric`` over seeds."""
    runs = [c[metric] for c in curves if metric in c and c[metric]]
    finals = [pts[-1][1] for pts in runs]
    aucs = [area_under_curve([s for s, _ in pts], [v for _, v in pts]) for pts in runs]
    slopes = [_error_slope(metric, pts) for pts in runs]
    return Summary(_mean_std(finals), _mean_std(aucs), _mean_std(slopes), len(runs))


def steps_to(curves: Sequence[Curve], metric: str, threshold: float) -> list[float | None]:
    """Per run, the first step where ``metric`` reaches ``threshold`` (None: never)."""
    up = higher_is_better(metric)
    return [
        steps_to_threshold([s for s, _ in c[metric]], [v for _, v in c[metric]], threshold, up)
        for c in curves
        if c.get(metric)
    ]


def comparison_table(
    base: Sequence[Curve],
    other: Sequence[Curve],
    metrics: Sequence[str],
    labels: tuple[str, str] = ("NTP", "PRIOR"),
    average: bool = True,
) -> tuple[str, dict[str, float]]:
    """A markdown table of ``other`` against ``base`` per metric: final and area under the curve
    (mean +- std over seeds) and the relative change as the paper reports it (see ``change``,
    positive = ``other`` better); with ``average``, a last row with the mean relative change over
    the bounded metrics. Returns the table and those averages."""
    a_name, b_name = labels
    rows = [
        f"| metric | better | {a_name} final | {b_name} final | change | {a_name} AUC | {b_name} AUC | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gains: dict[str, list[float]] = {"final": [], "auc": []}
    for metric in metrics:
        a, b = summarize(base, metric), summarize(other, metric)
        if not a.seeds or not b.seeds:
            continue
        final_gain = change(metric, a.final[0], b.final[0])
        auc_gain = change(metric, a.auc[0], b.auc[0])
        if not _unbounded(metric):
            gains["final"].append(final_gain)
            gains["auc"].append(auc_gain)
        rows.append(
            f"| {metric} | {'higher' if higher_is_better(metric) else 'lower'} | {_fmt(a.final, a.seeds)} | "
            f"{_fmt(b.final, b.seeds)} | {_pct(final_gain)} | {_fmt(a.auc, a.seeds)} | {_fmt(b.auc, b.seeds)} | "
            f"{_pct(auc_gain)} |"
        )
    averages = {k: _nanmean(v) for k, v in gains.items()}
    if average:
        spread = {k: _seed_spread(base, other, [m for m in metrics if not _unbounded(m)], k) for k in gains}
        rows.append(
            f"| **average relative change** ({len(gains['final'])} metrics) | | | | **{_pct(averages['final'])}**"
            f"{spread['final']} | | | **{_pct(averages['auc'])}**{spread['auc']} |"
        )
    return "\n".join(rows), averages


def _seed_spread(base: Sequence[Curve], other: Sequence[Curve], metrics: Sequence[str], stat: str) -> str:
    """`` ± std`` of the average relative change computed seed by seed (run i of ``base`` against
    run i of ``other``, which share initialisation and data order); empty for a single seed."""
    if len(base) != len(other) or len(base) < 2:
        return ""
    per_seed = []
    for a, b in zip(base, other, strict=True):
        changes = []
        for metric in metrics:
            sa, sb = summarize([a], metric), summarize([b], metric)
            if sa.seeds and sb.seeds:
                changes.append(change(metric, getattr(sa, stat)[0], getattr(sb, stat)[0]))
        per_seed.append(_nanmean(changes))
    return f" ± {np.nanstd(per_seed):.1%}"


def scaling_table(
    base: Sequence[Curve],
    other: Sequence[Curve],
    protocol: Protocol,
    labels: tuple[str, str] = ("NTP", "PRIOR"),
) -> str:
    """Steps to each threshold of ``protocol`` and the error's power-law slope per scaling metric."""
    a_name, b_name = labels
    rows = [f"| metric | reading | {a_name} | {b_name} |", "|---|---|---|---|"]
    for metric, threshold in protocol.thresholds.items():
        cells = [_steps(steps_to(runs, metric, threshold)) for runs in (base, other)]
        rows.append(f"| {metric} | steps to {threshold:g} | {cells[0]} | {cells[1]} |")
    for metric in protocol.scaling:
        a, b = summarize(base, metric), summarize(other, metric)
        if a.seeds and b.seeds:
            rows.append(
                f"| {metric} | error slope | {_fmt(a.error_slope, a.seeds)} | {_fmt(b.error_slope, b.seeds)} |"
            )
    return "\n".join(rows)


def protocol_report(
    base: Sequence[Curve],
    other: Sequence[Curve],
    protocol: Protocol,
    labels: tuple[str, str] = ("NTP", "PRIOR"),
) -> tuple[str, dict[str, float]]:
    """The protocol's tables as markdown (likelihood, generation, per-kind NLL, scaling) and the
    average relative changes: ``likelihood_final``, ``likelihood_auc``, ``generation_final``,
    ``generation_auc``. When ``base`` fails the protocol's validity gate the comparison is
    invalid: the tables are still shown, for inspection, but no average is computed (empty dict)."""
    valid, gate_value = protocol.passes_gate(base)
    parts: list[str] = []
    averages: dict[str, float] = {}
    if not valid:
        parts.append(
            f"**Invalid under the validity gate**: {protocol.gate['metric']} of {labels[0]} at the last step is "
            f"{gate_value:.3f} < {protocol.gate['min']}, so {labels[0]} does not read the image. The tables are "
            "shown for inspection; no average is reported."
        )
    for name, metrics, average in (
        ("Likelihood (pre-registered average)", protocol.likelihood, valid),
        ("Generation (greedy captions; averaged on its own)", protocol.generation, valid),
        ("NLL per token kind (shown, not averaged)", protocol.nll, False),
    ):
        if not metrics:
            continue
        table, avg = comparison_table(base, other, metrics, labels, average)
        parts.append(f"**{name}**\n\n{table}")
        if average:
            key = name.split()[0].lower()
            averages.update({f"{key}_{k}": v for k, v in avg.items()})
    if protocol.thresholds or protocol.scaling:
        parts.append("**Learning speed and scaling**\n\n" + scaling_table(base, other, protocol, labels))
    return "\n\n".join(parts), averages


def _steps(values: list[float | None]) -> str:
    if not values:
        return "n/a"
    shown = ["never" if v is None else f"{v:.0f}" for v in values]
    return " / ".join(shown)


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
    """Log-log plot of ``metric``'s error (1 - value when higher is better) against steps, with
    each group's power-law fit and its slope (the scaling coefficient)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    up = METRIC_DIRECTIONS.get(metric.rsplit("/", 1)[-1], True)
    for label, curves in groups.items():
        steps, mean, _ = mean_curve(curves, metric)
        mean = 1.0 - mean if up else mean
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
    ax.set_ylabel(f"1 - {metric.rsplit('/', 1)[-1]}" if up else metric.rsplit("/", 1)[-1])
    ax.set_title(f"scaling: error of {metric}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
