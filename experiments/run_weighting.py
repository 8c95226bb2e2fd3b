"""Every token-weighting scheme against NTP in the paper's settings, with the pre-registered protocol.

    python experiments/run_weighting.py                                  # U and H, full protocol
    python experiments/run_weighting.py --settings u --lrs "u=1e-3" --seeds 0,1,2

1. The pre-trained parts (as ``run_paper_regimes.py``; each skipped when its output exists).
2. Per setting and scheme (``SCHEMES``: NTP, PRIOR, PRIOR normalised per batch, PRIOR with a
   weight floor, Rho-1, CAL, DPA, the oracle), a learning-rate sweep on seed 0 over ``--lrs``;
   each scheme's rate is the one with the best final value of the protocol's selection metric
   on val. With one rate per setting there is no sweep.
3. Every seed (``--seeds``) at each scheme's own rate, unless NTP fails the protocol's validity
   gate on seed 0 (it does not read the image): that setting then gets no more runs.
4. ``experiments/aggregate_weighting.py`` writes the table and plot into ``--results``.

Runs live in ``<runs>/<setting>/<scheme>_lr<lr>_s<seed>``; a finished run is not run again, so
the script resumes. ``--parallel 2`` runs two single-thread processes side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.run_paper_regimes import SETTINGS, prepare, sh, train_jobs  # noqa: E402
from prior.eval.compare import Protocol, load_curve  # noqa: E402

#: Scheme label -> the overrides that select it (every knob at its config's default otherwise).
SCHEMES: dict[str, list[str]] = {
    "ntp": ["loss=ntp"],
    "prior": ["loss=prior"],
    "prior_batch": ["loss=prior", "loss.normalise=batch"],
    "prior_floor0.1": ["loss=prior", "loss.floor=0.1"],
    "rho": ["loss=rho"],
    "cal": ["loss=cal"],
    "dpa": ["loss=dpa"],
    "oracle": ["loss=oracle"],
}
LRS = {"h": "3e-3,1e-2", "u": "1e-3,3e-3"}  # where run_paper_regimes chose, and the next rate up


def parse_lrs(text: str) -> dict[str, list[str]]:
    """``u=3e-4,1e-3;h=1e-2`` -> per-setting rates (settings not named keep ``LRS``)."""
    lrs = {s: v.split(",") for s, v in LRS.items()}
    for part in filter(None, text.split(";")):
        setting, _, values = part.partition("=")
        lrs[setting.strip()] = values.split(",")
    return lrs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="logs/weighting")
    parser.add_argument("--results", default="experiments/results/weighting")
    parser.add_argument("--settings", default="u,h", type=lambda s: s.split(","))
    parser.add_argument("--schemes", default=",".join(SCHEMES), type=lambda s: s.split(","))
    parser.add_argument("--lrs", default="", type=parse_lrs, help="per setting, e.g. 'u=3e-4,1e-3;h=1e-2'")
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--trainer", default="cpu")
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--machine", default=os.environ.get("MACHINE", "2-core CPU"))
    a = parser.parse_args(argv)
    unknown = sorted(set(a.schemes) - set(SCHEMES))
    if unknown:
        parser.error(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    py, runs = sys.executable, Path(a.runs)
    env = dict(os.environ, WANDB_MODE="offline")
    if a.parallel > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    protocol = Protocol.load("demo")
    start = time.time()
    extra = [f"callbacks.periodic_eval.every_n_steps={a.eval_every}"]

    def job(setting: str, scheme: str, lr: str, seed: int) -> list[str]:
        return [f"experiment={SETTINGS[setting]}", *SCHEMES[scheme], f"optimizer.lr={lr}", f"seed={seed}"]

    def train(jobs: dict[str, list[str]]) -> None:
        train_jobs(py, jobs, runs, a.steps, a.trainer, a.parallel, env, extra)

    print("== pre-trained parts", flush=True)
    prepare(py, argparse.Namespace(runs=a.runs, trainer=a.trainer, corpus=a.corpus, noise_ablation=False), env)

    print("== learning-rate sweep (seed 0)", flush=True)
    schemes = [s for s in SCHEMES if s in a.schemes]
    train({f"{s}/{k}_lr{lr}_s0": job(s, k, lr, 0) for s in a.settings for k in schemes for lr in a.lrs[s]})
    selected = {}
    for s in a.settings:
        metric = protocol.selection["metric"]
        for k in schemes:
            scores = {lr: load_curve(runs / s / f"{k}_lr{lr}_s0").get(metric, [(0, float("-inf"))])[-1][1]
                      for lr in a.lrs[s]}
            selected[f"{s}/{k}"] = max(scores, key=scores.get)
            print(f"  {s} {k}: {metric} by lr {scores} -> {selected[f'{s}/{k}']}", flush=True)

    print("== seeds at each scheme's own rate", flush=True)
    jobs = {}
    for s in a.settings:
        if "ntp" in schemes:  # NTP must read the image on seed 0, or the setting gets no more runs
            ok, value = protocol.passes_gate([load_curve(runs / s / f"ntp_lr{selected[f'{s}/ntp']}_s0")])
            if not ok:
                print(f"  {s}: NTP fails the validity gate on seed 0 ({protocol.gate['metric']} {value:.3f} < "
                      f"{protocol.gate['min']}): no more seeds", flush=True)
                continue
        jobs.update({f"{s}/{k}_lr{selected[f'{s}/{k}']}_s{seed}": job(s, k, selected[f"{s}/{k}"], seed)
                     for k in schemes for seed in a.seeds})
    train(jobs)

    # Merge with the settings that earlier invocations chose (``--settings h`` after ``--settings u``).
    record = runs / "selection.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    record.write_text(json.dumps({"selected_lr": {**previous.get("selected_lr", {}), **selected},
                                  "swept": {**previous.get("swept", {}), **{s: a.lrs[s] for s in a.settings}}},
                                 indent=2))
    print(f"== aggregate ({(time.time() - start) / 60:.0f} min so far)", flush=True)
    sh([py, str(ROOT / "experiments" / "aggregate_weighting.py"), a.runs, "--out", a.results, "--machine", a.machine,
        "--steps", str(a.steps)], runs / "aggregate.log", env)
    print((Path(a.results) / "README.md").read_text())


if __name__ == "__main__":
    main()
