"""Learning curves of NTP, PRIOR and PRIOR with a weight floor from committed experiment results.

    python experiments/plot_curves.py                    # experiments/results/weighting, setting U
    python experiments/plot_curves.py experiments/results/paper_regimes --setting u --schemes ntp prior

Reads only what an experiment's aggregation committed: ``<results>/runs/selection.json`` (each
scheme's learning rate chosen on val, ``selected_lr``: ``"<setting>/<scheme>" -> lr``) and every
seed's ``<results>/runs/<setting>/<scheme>_lr<lr>_s<seed>/eval_curve.jsonl``. Each scheme is drawn
at its own chosen rate, as the mean over seeds with a band of ± one standard deviation, on metrics of
the pre-registered protocol (``conf/protocol/demo.yaml``). When NTP fails the protocol's validity
gate in that setting, the title says the comparison is invalid. Writes ``<results>/curves.png``
(``--out`` to change) as a small PNG for the README.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prior.eval.compare import CURVE_FILE, Curve, Protocol, load_curve, mean_curve  # noqa: E402
from prior.eval.metrics import METRIC_DIRECTIONS  # noqa: E402

#: Pre-registered metrics (conf/protocol/demo.yaml) that tell PRIOR's story: colour grounding on
#: counter-prior images, what it costs elsewhere, and whether down-weighted tokens stay trained.
DEFAULT_METRICS = (
    "test_counter/choice_accuracy_color",
    "test_counter/prior_pick_rate",
    "test/choice_accuracy_count",
    "test_counter/nll_color_counter",
    "test_counter/nll_function",
    "test/bleu4",
)
DEFAULT_SCHEMES = ("ntp", "prior", "prior_floor0.1")
LABELS = {"ntp": "NTP", "prior": "PRIOR", "prior_floor0.1": "PRIOR, floor 0.1"}
STYLES = {"ntp": ("#4a4a4a", "o", "-"), "prior": ("#dc285a", "s", "--"), "prior_floor0.1": ("#1f77b4", "^", "-")}


def load_groups(results: Path, setting: str, schemes: Sequence[str]) -> dict[str, tuple[str, list[Curve]]]:
    """scheme -> (its chosen rate, one curve per seed), for the schemes that have runs at that rate.

    A scheme without a chosen rate or without runs is left out with a note on stderr; an error
    when ``selection.json`` is missing or no scheme has runs.
    """
    selection_file = results / "runs" / "selection.json"
    if not selection_file.exists():
        raise SystemExit(f"{selection_file} does not exist: pass a results folder that an "
                         "experiments/aggregate_*.py script wrote (it holds runs/selection.json).")
    selected = json.loads(selection_file.read_text()).get("selected_lr", {})
    groups: dict[str, tuple[str, list[Curve]]] = {}
    for scheme in schemes:
        lr = selected.get(f"{setting}/{scheme}")
        name = re.compile(rf"{re.escape(scheme)}_lr{re.escape(lr or '')}_s(?P<seed>\d+)")
        runs = [(int(m["seed"]), d) for d in (results / "runs" / setting).glob("*")
                if lr and (m := name.fullmatch(d.name)) and (d / CURVE_FILE).exists()]
        paths = [d for _, d in sorted(runs)]
        if not paths:
            print(f"left out: {scheme} has no chosen rate or no runs in setting {setting} of {results}",
                  file=sys.stderr)
            continue
        groups[scheme] = (lr, [load_curve(d) for d in paths])
    if not groups:
        raise SystemExit(f"No runs of {', '.join(schemes)} in setting {setting!r} under {results / 'runs'}.")
    return groups


def plot(groups: Mapping[str, tuple[str, list[Curve]]], metrics: Sequence[str], path: Path, title: str) -> Path:
    """One panel per metric: each scheme's mean over seeds, with a ± std band, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in c for _, curves in groups.values() for c in curves)]
    if not metrics:
        raise SystemExit("None of the metrics is in the runs' curves: check --metrics.")
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.45 * rows + 0.4), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for scheme, (lr, curves) in groups.items():
            steps, mean, std = mean_curve(curves, metric)
            if not steps.size:
                continue
            color, marker, line = STYLES.get(scheme, (None, "o", "-"))
            label = f"{LABELS.get(scheme, scheme)} (lr {lr}, {len(curves)} seeds)"
            (drawn,) = ax.plot(steps, mean, line, marker=marker, ms=3, lw=1.4, color=color, label=label)
            ax.fill_between(steps, mean - std, mean + std, color=drawn.get_color(), alpha=0.18, lw=0)
        better = "higher" if METRIC_DIRECTIONS.get(metric.rsplit("/", 1)[-1], True) else "lower"
        ax.set_title(f"{metric} ({better} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?", default=ROOT / "experiments" / "results" / "weighting",
                        help="a committed results folder (with runs/selection.json)")
    parser.add_argument("--setting", default="u", help="h or u (a folder under runs/)")
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES))
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path, help="the PNG to write (default: <results>/curves.png)")
    args = parser.parse_args(argv)
    groups = load_groups(args.results, args.setting, args.schemes)
    protocol = Protocol.load("demo")
    seeds = sorted({len(curves) for _, curves in groups.values()})
    title = (f"Setting {args.setting.upper()}, demo scale: mean ± std over "
             f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}, each loss at its own learning rate")
    if "ntp" in groups:
        valid, value = protocol.passes_gate(groups["ntp"][1])
        if not valid:
            title += (f"\nINVALID under the validity gate: NTP's {protocol.gate['metric']} "
                      f"{value:.3f} < {protocol.gate['min']}")
    path = plot(groups, args.metrics, args.out or args.results / "curves.png", title)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
    return path


if __name__ == "__main__":
    main()
