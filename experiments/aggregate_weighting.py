"""The table and plots of ``experiments/run_weighting.py``: every weighting scheme against NTP.

    python experiments/aggregate_weighting.py logs/weighting --out experiments/results/weighting
    python experiments/aggregate_weighting.py experiments/results/weighting/runs \
        --out experiments/results/weighting                     # again, from the committed curves

Run folders are ``<runs>/<setting>/<scheme>_lr<lr>_s<seed>``; ``<runs>/selection.json`` holds each
scheme's rate chosen on val. Per setting: the validity gate (NTP must read the image), one row per
scheme at its own rate against NTP at its own (the pre-registered likelihood and generation
averages, final and over the curve, with the seed spread), the metrics PRIOR is about, the
training throughput relative to NTP in the same sweep, the learning curves, and each scheme's
full protocol tables in ``details.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.aggregate_regimes import TITLES, copy_runs, finished  # noqa: E402
from experiments.run_weighting import SCHEMES  # noqa: E402
from prior.eval.compare import (  # noqa: E402
    CURVE_FILE,
    Curve,
    Protocol,
    _seed_spread,
    load_curve,
    plot_curves,
    protocol_report,
    summarize,
)

NAME = re.compile(r"(?P<scheme>[a-z0-9_.]+?)_lr(?P<lr>[0-9.e-]+)_s(?P<seed>\d+)$")
#: What the table shows besides the averages (final value, mean over seeds).
FOCUS = [
    ("test_counter/choice_accuracy_color", "colour choice, counter-prior"),
    ("test_counter/prior_pick_rate", "prior picks"),
    ("test/choice_accuracy_count", "count choice"),
    ("test_counter/nll_function", "NLL function words"),
    ("test/bleu4", "BLEU-4"),
]


def find_runs(root: Path, steps: int) -> dict[str, dict[tuple[str, str], dict[int, Curve]]]:
    """setting -> (scheme, lr) -> seed -> curve, for the finished runs."""
    runs: dict[str, dict[tuple[str, str], dict[int, Curve]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(root.glob(f"*/*/{CURVE_FILE}")):
        match = NAME.match(path.parent.name)
        if match and match["scheme"] in SCHEMES and finished(path.parent, steps):
            runs[path.parent.parent.name][(match["scheme"], match["lr"])][int(match["seed"])] = load_curve(path.parent)
    return runs


def samples_per_s(run_dir: Path) -> float | None:
    """Median logged training throughput of a run (from its csv log; None when not logged)."""
    values = []
    for metrics in run_dir.glob("csv/version_*/metrics.csv"):
        with metrics.open() as f:
            values += [float(r["throughput/samples_per_s"]) for r in csv.DictReader(f) if r.get("throughput/samples_per_s")]
    return statistics.median(values) if values else None


def throughput_ratio(runs_dir: Path, setting: str, scheme: str, lr: str, ntp_lr: str, seeds: list[int]) -> str:
    """Training throughput of NTP over the scheme's (= the scheme's step-time ratio), median over seeds."""
    ratios = []
    for seed in seeds:
        own = samples_per_s(runs_dir / setting / f"{scheme}_lr{lr}_s{seed}")
        ntp = samples_per_s(runs_dir / setting / f"ntp_lr{ntp_lr}_s{seed}")
        if own and ntp:
            ratios.append(ntp / own)
    return f"{statistics.median(ratios):.2f}x" if ratios else "n/a"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:+.1f}%"


def section(setting: str, runs: dict, selected: dict[str, str], protocol: Protocol, runs_dir: Path, out: Path):
    """The markdown of one setting, its rows for the summary, and its details."""
    schemes = [s for s in SCHEMES if f"{setting}/{s}" in selected and (s, selected[f"{setting}/{s}"]) in runs]
    group = {s: [runs[(s, selected[f"{setting}/{s}"])][seed] for seed in sorted(runs[(s, selected[f"{setting}/{s}"])])]
             for s in schemes}
    if "ntp" not in group:
        return f"## {TITLES.get(setting, setting)}\n\nNo finished NTP run: nothing to compare.\n", ""
    ntp = group["ntp"]
    valid, gate = protocol.passes_gate(ntp)
    head = ["scheme", "lr", "seeds", "likelihood avg, final", "likelihood avg, AUC", "generation avg, final",
            *(label for _, label in FOCUS), "step time vs NTP"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    details = [f"# {TITLES.get(setting, setting)}: every scheme's protocol tables against NTP\n"]
    for scheme in schemes:
        curves, lr = group[scheme], selected[f"{setting}/{scheme}"]
        seeds = sorted(runs[(scheme, lr)])
        if scheme == "ntp":
            avg = {}
        else:
            tables, avg = protocol_report(ntp, curves, protocol, ("NTP", scheme))
            details.append(f"## {scheme} (lr {lr}, {len(curves)} seeds) against NTP (lr {selected[f'{setting}/ntp']})\n\n{tables}\n")
        focus = []
        for metric, _ in FOCUS:
            s = summarize(curves, metric)
            focus.append("n/a" if not s.seeds else f"{s.final[0]:.3f} ± {s.final[1]:.3f}")
        cost = "1.00x" if scheme == "ntp" else throughput_ratio(runs_dir, setting, scheme, lr, selected[f"{setting}/ntp"], seeds)
        avgs = ["—"] * 3 if scheme == "ntp" else [
            _pct(avg.get("likelihood_final")) + _seed_spread(ntp, curves, protocol.likelihood, "final"),
            _pct(avg.get("likelihood_auc")) + _seed_spread(ntp, curves, protocol.likelihood, "auc"),
            _pct(avg.get("generation_final")) + _seed_spread(ntp, curves, protocol.generation, "final")]
        rows.append(f"| {scheme} | {lr} | {len(curves)} | " + " | ".join([*avgs, *focus, cost]) + " |")
    plot = plot_curves(group, [m for m, _ in FOCUS] + ["test/choice_accuracy", "val/choice_accuracy"],
                       out / f"curves_{setting}.png", title=f"setting {setting.upper()}: each scheme at its own rate")
    gate_line = (f"Validity gate ({protocol.gate['metric']} of NTP at the last step >= {protocol.gate['min']}): "
                 f"{'passed' if valid else '**failed**'} ({gate:.3f}).")
    if not valid:
        gate_line += " NTP does not read the image here: the averages are not reported; the rows are for inspection."
    text = f"""## {TITLES.get(setting, setting)}

{gate_line}

{chr(10).join(rows)}

Learning curves: [`{plot.name}`]({plot.name}); every scheme's full tables: [`details.md`](details.md).
"""
    return text, "\n".join(details)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/weighting"))
    parser.add_argument("--machine", default="2-core CPU")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    runs = find_runs(args.runs, args.steps)
    if not runs:
        raise SystemExit(f"No finished runs under {args.runs}: run experiments/run_weighting.py first.")
    args.out.mkdir(parents=True, exist_ok=True)
    copy_runs(args.runs, args.out / "runs", args.steps)
    _copy_throughput(args.runs, args.out / "runs", args.steps)
    selection = json.loads((args.runs / "selection.json").read_text())
    protocol = Protocol.load("demo")
    sections, details = [], []
    for setting in sorted(runs):
        text, detail = section(setting, runs[setting], selection["selected_lr"], protocol, args.runs, args.out)
        sections.append(text)
        details.append(detail)
    (args.out / "details.md").write_text("\n\n".join(details))
    one = next(args.runs.glob(f"*/*/{CURVE_FILE}")).parent
    cfg = OmegaConf.load(one / ".hydra" / "config.yaml")
    ev = cfg.callbacks.periodic_eval
    swept = ", ".join(f"{s}: {', '.join(v)}" for s, v in selection.get("swept", {}).items() if s in runs)
    text = f"""# Token-weighting schemes against NTP (demo scale)

Measured on {args.machine} ({date.today().isoformat()}) by `python experiments/run_weighting.py`;
this page by `python experiments/aggregate_weighting.py {args.out}/runs --out {args.out}`, from every
run's curve and config in `runs/`. Protocol fixed before the runs in `conf/protocol/demo.yaml`. Every
run: {args.steps} steps of batch {cfg.data.batch_size}, evaluated every {ev.every_n_steps} steps on
{ev.limit} images of {', '.join(f'`{s}`' for s in ev.splits)}. Rates swept on seed 0 ({swept}); each
scheme at the rate its seed-0 run chose on `val/choice_accuracy`. *Averages* are the scheme's mean relative
change over NTP on the pre-registered metrics (positive = better than NTP; a lower-is-better rate
compares as 1 - rate), ± the std of that average computed seed by seed; the other columns are
final values, mean ± std over seeds. *Step time vs NTP*
is NTP's median logged training throughput over the scheme's, in the same sweep (runs side by side,
evaluation excluded; `experiments/bench_weighting.py` measures it in isolation).

Schemes (`experiments/run_weighting.py`): {', '.join(f'`{k}` = `{" ".join(v)}`' for k, v in SCHEMES.items())}.

{chr(10).join(sections)}"""
    notes = args.out / "notes.md"  # the reading of the results, kept by hand
    if notes.exists():
        text = text.replace("\n\nSchemes (", f"\n\n{notes.read_text().strip()}\n\nSchemes (", 1)
    (args.out / "README.md").write_text(text)
    print(text)


def _copy_throughput(runs: Path, dest: Path, steps: int) -> None:
    """Keep each run's logged metrics (the throughput column) beside its curve."""
    if runs.resolve() == dest.resolve():
        return
    for path in runs.glob(f"*/*/{CURVE_FILE}"):
        if finished(path.parent, steps):
            for metrics in path.parent.glob("csv/version_*/metrics.csv"):
                target = dest / metrics.relative_to(runs)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(metrics.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
