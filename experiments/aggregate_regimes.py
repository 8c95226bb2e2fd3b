"""Tables and plots of ``experiments/run_paper_regimes.py`` under the pre-registered protocol.

    python experiments/aggregate_regimes.py logs/paper_regimes --out experiments/results/paper_regimes
    python experiments/aggregate_regimes.py experiments/results/paper_regimes/runs \
        --out experiments/results/paper_regimes                 # again, from the committed curves

Run folders are ``<runs>/<setting>/<loss>[_<variant>]_lr<lr>_s<seed>``; ``<runs>/selection.json``
holds each loss's learning rate chosen on val and the shared rate. Per setting: the validity gate,
PRIOR vs NTP at each one's own rate (the headline) and at the shared rate, the sweep, and the
ablations (alpha 0.5, no noise), with learning curves and the scaling plot. Each run's curve and
composed config are copied under ``<out>/runs`` so the page can be rebuilt from what is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prior.eval.compare import (  # noqa: E402
    CURVE_FILE,
    Curve,
    Protocol,
    comparison_table,
    load_curve,
    plot_curves,
    plot_scaling,
    protocol_report,
    summarize,
)

NAME = re.compile(r"(?P<loss>ntp|prior)(?:_(?P<variant>[a-z0-9.]+?))?_lr(?P<lr>[0-9.e-]+)_s(?P<seed>\d+)$")
TITLES = {"h": "H: frozen vision tower + frozen base LM, projector only (`experiment=demo_h`)",
          "u": "U: encoder-free, LM initialised from the base LM, all trained (`experiment=demo_u`)"}


def finished(run_dir: Path, steps: int) -> bool:
    """Whether a run's evaluation curve reaches ``steps`` (False for a run not started yet)."""
    if not (Path(run_dir) / CURVE_FILE).exists():
        return False
    return max((s for points in load_curve(run_dir).values() for s, _ in points), default=0) >= steps


def find_runs(root: Path, steps: int) -> dict[str, dict[tuple[str, str, str], dict[int, Curve]]]:
    """setting -> (loss, variant, lr) -> seed -> curves, of the runs whose curve reaches ``steps``."""
    runs: dict[str, dict[tuple[str, str, str], dict[int, Curve]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(root.glob(f"*/*/{CURVE_FILE}")):
        match = NAME.match(path.parent.name)
        if not match:
            continue
        if not finished(path.parent, steps):
            print(f"left out, not finished: {path.parent}", file=sys.stderr)
            continue
        key = (match["loss"], match["variant"] or "", match["lr"])
        runs[path.parent.parent.name][key][int(match["seed"])] = load_curve(path.parent)
    return runs


def _pct(x: float) -> str:
    return f"{x:+.1%}" if math.isfinite(x) else "n/a"


def seeds(group: dict[int, Curve]) -> list[Curve]:
    return [group[s] for s in sorted(group)]


def section(setting: str, runs: dict, sel: dict, shared: str, protocol: Protocol, out: Path) -> tuple[str, str]:
    """The markdown section of one setting and its row in the summary table."""
    lr_ntp, lr_prior = sel[f"{setting}/ntp"], sel[f"{setting}/prior"]
    ntp, prior = seeds(runs[("ntp", "", lr_ntp)]), seeds(runs[("prior", "", lr_prior)])
    ok, gate_value = protocol.passes_gate(ntp)
    gate = (f"{'passed' if ok else '**failed: the H result is invalid**'} "
            f"({protocol.gate['metric']} of NTP at the last step {gate_value:.3f}, needed >= {protocol.gate['min']})")
    report, avg = protocol_report(ntp, prior, protocol)
    parts = [f"## {TITLES.get(setting, setting)}\n", f"Validity gate: {gate}.\n",
             f"### PRIOR vs NTP, each at its own learning rate (NTP {lr_ntp}, PRIOR {lr_prior}; "
             f"{len(ntp)} / {len(prior)} seeds)\n", report + "\n"]
    groups = {f"NTP lr {lr_ntp}": ntp, f"PRIOR lr {lr_prior}": prior}
    shared_ntp, shared_prior = runs.get(("ntp", "", shared)), runs.get(("prior", "", shared))
    shared_avg = math.nan
    if shared_ntp and shared_prior:
        table, s_avg = comparison_table(seeds(shared_ntp), seeds(shared_prior), protocol.likelihood, average=ok)
        shared_avg = s_avg["final"]
        parts += [f"### At the shared learning rate {shared} ({len(shared_ntp)} / {len(shared_prior)} seeds), "
                  "likelihood metrics\n", table + "\n"]
    metric = protocol.selection["metric"]
    rows = ["| loss | lr | " + metric + " (selection) | test_counter/choice_accuracy_color | test/choice_accuracy |",
            "|---|---|---|---|---|"]
    for (loss, variant, lr), group in sorted(runs.items()):
        if variant or 0 not in group:
            continue
        c = group[0]
        cells = [f"{c[m][-1][1]:.3f}" if m in c else "n/a"
                 for m in (metric, "test_counter/choice_accuracy_color", "test/choice_accuracy")]
        chosen = " (chosen)" if lr == sel[f"{setting}/{loss}"] else ""
        rows.append(f"| {loss} | {lr}{chosen} | " + " | ".join(cells) + " |")
    parts += ["### Learning-rate sweep (seed 0, final values)\n", "\n".join(rows) + "\n"]
    for variant, what in (("alpha0.5", "PRIOR with `loss.alpha=0.5` against NTP, at their chosen rates"),
                          ("nonoise", "no-noise corpus (`noise_p=0`, its own reference LM and weights), "
                                      "PRIOR against NTP at their chosen rates")):
        other = runs.get(("prior", variant, lr_prior))
        base = runs.get(("ntp", variant, lr_ntp)) if variant == "nonoise" else runs[("ntp", "", lr_ntp)]
        if other and base:
            table, _ = comparison_table(seeds(base), seeds(other), protocol.likelihood, average=ok)
            parts += [f"### Ablation: {what} ({len(base)} / {len(other)} seeds), likelihood metrics\n", table + "\n"]
            if variant == "alpha0.5":
                groups[f"PRIOR a=0.5 lr {lr_prior}"] = seeds(other)
    curves = plot_curves(groups, [*protocol.likelihood, *protocol.generation[:2]], out / f"curves_{setting}.png",
                         title=TITLES.get(setting, setting).split(" (")[0])
    scaling = plot_scaling({k: v for k, v in groups.items() if "a=0.5" not in k},
                           "test_counter/choice_accuracy_color", out / f"scaling_{setting}.png")
    parts.append(f"![curves]({curves.name})\n![scaling]({scaling.name})\n")
    color = [summarize(g, "test_counter/choice_accuracy_color").final[0] for g in (ntp, prior)]
    figures = [avg.get(k, math.nan) for k in ("likelihood_final", "likelihood_auc", "generation_final")]
    cells = " | ".join(_pct(x) for x in [*figures, shared_avg]) if ok else "invalid | invalid | invalid | invalid"
    row = (f"| {setting.upper()} | {'passed' if ok else 'FAILED'} | {len(ntp)}/{len(prior)} | {cells} | "
           f"{color[0]:.3f} -> {color[1]:.3f} |")
    return "\n".join(parts), row


def copy_runs(runs: Path, dest: Path, steps: int) -> None:
    """Keep what the tables are made of beside them: every run's curve and composed config, and
    the learning-rate selection (checkpoints and exports stay behind)."""
    if runs.resolve() == dest.resolve():
        return
    for path in runs.glob(f"*/*/{CURVE_FILE}"):
        if not finished(path.parent, steps):
            continue
        target = dest / path.parent.relative_to(runs)
        (target / ".hydra").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / CURVE_FILE)
        for name in ("config.yaml", "overrides.yaml"):
            shutil.copy2(path.parent / ".hydra" / name, target / ".hydra" / name)
    shutil.copy2(runs / "selection.json", dest / "selection.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/paper_regimes"))
    parser.add_argument("--machine", default="2-core CPU")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    copy_runs(args.runs, args.out / "runs", args.steps)
    protocol = Protocol.load("demo")
    selection = json.loads((args.runs / "selection.json").read_text())
    runs = find_runs(args.runs, args.steps)
    if not runs:
        raise SystemExit(f"No runs under {args.runs}: run experiments/run_paper_regimes.py first.")
    args.out.mkdir(parents=True, exist_ok=True)
    sections, rows = [], []
    for setting in sorted(runs):
        text, row = section(setting, runs[setting], selection["selected_lr"], selection["shared_lr"][setting],
                            protocol, args.out)
        sections.append(text)
        rows.append(row)
    one = next(args.runs.glob(f"*/*/{CURVE_FILE}")).parent
    cfg = OmegaConf.load(one / ".hydra" / "config.yaml")
    ev = cfg.callbacks.periodic_eval
    text = f"""# PRIOR vs NTP in the paper's two settings (demo scale)

Measured on {args.machine} ({date.today().isoformat()}) by `python experiments/run_paper_regimes.py`;
these tables by `python experiments/aggregate_regimes.py {args.out}/runs --out {args.out}`, from
every run's curve and config in `runs/`. Protocol
fixed before the runs in `conf/protocol/demo.yaml`. Every run: {args.steps} steps of batch
{cfg.data.batch_size}, evaluated every {ev.every_n_steps} steps on {ev.limit} images of
{', '.join(f'`{s}`' for s in ev.splits)}; choices score the mean log-probability per token. *final* is
the last step, *AUC* the mean over the learning curve, *change* is PRIOR relative to NTP (positive =
PRIOR better; a lower-is-better rate compares as 1 - rate). Values are mean ± std over seeds.

| setting | gate | seeds NTP/PRIOR | likelihood avg, final | likelihood avg, AUC | generation avg, final | likelihood avg at shared lr | colour choice (test_counter) NTP -> PRIOR |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(sections)}"""
    notes = args.out / "notes.md"  # the reading of the results, kept by hand
    if notes.exists():
        text = text.replace("\n\n| setting |", f"\n\n{notes.read_text().strip()}\n\n| setting |", 1)
    (args.out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
