"""Aggregate the from-scratch PRIOR-vs-NTP experiment (experiments/run_prior_vs_ntp.sh) into
tables per backbone under the pre-registered protocol (conf/protocol/demo.yaml: likelihood and
generation tables averaged separately, NLL per token kind, steps to threshold and error slopes)
and PNG plots (learning curves and the power-law fit of the error).

    python experiments/aggregate.py logs/prior_vs_ntp --out experiments/results/from_scratch
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

from omegaconf import OmegaConf

from prior.eval.compare import CURVE_FILE, Curve, Protocol, load_curve, plot_curves, plot_scaling, protocol_report


def find_runs(root: Path) -> tuple[dict[str, dict[str, dict[int, Curve]]], dict]:
    """backbone -> loss -> seed -> learning curves from every run folder under ``root``, and the
    config of one of the runs (they differ only in backbone, loss and seed)."""
    runs: dict[str, dict[str, dict[int, Curve]]] = defaultdict(lambda: defaultdict(dict))
    cfg = None
    for curve_file in sorted(root.rglob(CURVE_FILE)):
        cfg = OmegaConf.load(curve_file.parent / ".hydra" / "config.yaml")
        runs[cfg.backbone.name][cfg.loss.name][int(cfg.seed)] = load_curve(curve_file.parent)
    if cfg is None:
        raise SystemExit(f"No {CURVE_FILE} under {root}: run experiments/run_prior_vs_ntp.sh first.")
    return runs, cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the sweep folder (OUT of run_prior_vs_ntp.sh)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/from_scratch"))
    parser.add_argument("--machine", default=os.environ.get("MACHINE") or platform.machine(), help="where the runs ran")
    parser.add_argument("--corpus", default=os.environ.get("CORPUS", "default"), help="the corpus preset used")
    args = parser.parse_args(argv)
    runs, cfg = find_runs(args.runs)
    protocol = Protocol.load("demo")
    ev = cfg.callbacks.periodic_eval
    llm = cfg.llm.config
    args.out.mkdir(parents=True, exist_ok=True)
    sections, summary = [], []
    for backbone in sorted(runs):
        ntp = [runs[backbone]["ntp"][s] for s in sorted(runs[backbone].get("ntp", {}))]
        prior = [runs[backbone]["prior"][s] for s in sorted(runs[backbone].get("prior", {}))]
        table, averages = protocol_report(ntp, prior, protocol)
        groups = {"NTP": ntp, "PRIOR": prior}
        curves = plot_curves(groups, [*protocol.likelihood, *protocol.generation], args.out / f"curves_{backbone}.png",
                             title=f"{backbone}: PRIOR vs NTP")
        scaling = [plot_scaling(groups, m, args.out / f"scaling_{backbone}_{m.replace('/', '_')}.png")
                   for m in protocol.scaling]
        summary.append(
            f"| {backbone} | {len(ntp)} / {len(prior)} | {averages['likelihood_final']:+.1%} | "
            f"{averages['likelihood_auc']:+.1%} | {averages.get('generation_final', float('nan')):+.1%} |"
        )
        images = "\n".join(f"![{p.stem}]({p.name})" for p in [curves, *scaling])
        sections.append(f"## {backbone}\n\n{table}\n\n{images}\n")
    text = f"""# PRIOR vs NTP on the demo corpus

Measured by `experiments/run_prior_vs_ntp.sh` ({date.today().isoformat()}, {args.machine});
the table is written by `python experiments/aggregate.py {args.runs} --out {args.out}`.
Every run: the demo corpus (`prior-demo-data corpus={args.corpus}`), the same reference LM and weights, a
{cfg.llm.model_type} LM built from its config ({llm.num_hidden_layers} layers, width {llm.hidden_size}),
{cfg.trainer.max_steps} steps of batch {cfg.data.batch_size}, {cfg.optimizer._target_.rsplit('.', 1)[-1]}
lr {cfg.optimizer.lr} with {cfg.scheduler._target_.rsplit('.', 1)[-1]}, evaluated every
{ev.every_n_steps} steps on {ev.limit} images of {', '.join(f'`{s}`' for s in ev.splits)}. NTP and
PRIOR runs of a seed share initialisation and data order. Values are mean ± std over seeds; *final*
is step {cfg.trainer.max_steps}, *AUC* the mean over the learning curve, *error slope* the power-law exponent of
the error (1 - accuracy) against steps (the table averages the per-seed fits, the scaling plots fit
the seed-mean curve); *change* is PRIOR relative to NTP, positive when PRIOR is better in the
metric's direction. Protocol: conf/protocol/demo.yaml. Reported as measured.

| backbone | seeds (NTP / PRIOR) | likelihood avg, final | likelihood avg, AUC | generation avg, final |
|---|---|---|---|---|
{chr(10).join(summary)}

{chr(10).join(sections)}"""
    notes = args.out / "notes.md"  # how the runs were made and what they show, kept by hand
    if notes.exists():
        text = text.replace("\n\n| backbone |", f"\n\n{notes.read_text().strip()}\n\n| backbone |", 1)
    (args.out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
