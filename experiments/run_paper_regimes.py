"""PRIOR vs NTP in the paper's two settings at demo scale, with the pre-registered protocol.

    python experiments/run_paper_regimes.py                      # everything, 2 runs side by side
    python experiments/run_paper_regimes.py --parallel 1 --steps 300 --seeds 0,1

1. The pre-trained parts, each skipped when its output exists: the demo corpus, the base corpus
   (its own seed, verbal scenes), the tokenizer, the base LM, the vision tower, the reference LM
   (the base LM fine-tuned on the LVLM captions) and its weights.
2. Learning-rate sweep on val (seed 0): per setting (``demo_h``, ``demo_u``) and loss (NTP,
   PRIOR), three rates; each loss's rate is picked by the protocol's selection metric on val.
3. The comparison: every seed (``--seeds``) at each loss's own rate, and ``--shared-seeds`` at the
   shared rate (the recipe's; seed 0 by default, which the sweep already ran). A setting whose
   NTP fails the protocol's validity gate on seed 0 at its best rate is invalid: it gets no
   more runs (its sweep is reported as such).
4. Ablations (``--ablation-seeds``) at the chosen rates: PRIOR with ``loss.alpha=0.5``, and a corpus
   without noise (``noise_p=0``, its own reference LM and weights) for both losses.
5. ``experiments/aggregate_regimes.py`` writes the tables and plots into ``--results``.

Every run is one ``prior-train-lvlm`` process whose folder is ``<runs>/<setting>/<name>``; a run
whose evaluation curve already reaches the last step is not run again, so the script resumes.
With ``--parallel 2`` each process uses one thread (two single-thread runs beat one two-thread
run on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.aggregate_regimes import finished  # noqa: E402
from prior.eval.compare import Protocol, load_curve  # noqa: E402

SETTINGS = {"h": "demo_h", "u": "demo_u"}
LRS = {"h": ("1e-3", "3e-3", "1e-2"), "u": ("1e-4", "3e-4", "1e-3")}
SHARED_LR = {"h": "1e-3", "u": "3e-4"}  # the recipes' rates


def sh(args: list[str], log: Path, env: dict[str, str]) -> None:
    """Run one command, its output into ``log``; raise with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args)} failed ({code}); end of {log}:\n{tail}")
    print(f"  done in {time.time() - start:5.0f} s: {log.parent.name}/{log.name}", flush=True)


def prepare(py: str, a: argparse.Namespace, env: dict[str, str]) -> None:
    """The pre-trained parts, each skipped when its output exists."""
    data, art, logs = ROOT / "data", ROOT / "artifacts" / "demo", Path(a.runs) / "stages"
    common = ["logger=csv", f"trainer={a.trainer}"]
    stages = [
        ("corpus", data / "demo" / "train" / "manifest.json", ["prior.cli.demo_data", f"corpus={a.corpus}"]),
        ("base_corpus", data / "demo_base" / "train" / "manifest.json",
         ["prior.cli.demo_data", "--config-name", "demo_base_data", f"corpus={a.corpus}"]),
        ("tokenizer", data / "demo" / "tokenizer" / "tokenizer.json", ["prior.cli.tokenizer"]),
        ("base_lm", art / "base" / "model.safetensors", ["prior.cli.train_base", *common]),
        ("vision_tower", art / "vision" / "model.safetensors", ["prior.cli.train_vision", *common]),
        ("reference", art / "reference" / "model.safetensors", ["prior.cli.train_ref", "--config-name", "train_ref_base", *common]),
        ("weights", data / "demo" / "train" / "00000.prior.npz", ["prior.cli.weights"]),
    ]
    if a.noise_ablation:
        stages += [
            ("corpus_nonoise", data / "demo_nonoise" / "train" / "manifest.json",
             ["prior.cli.demo_data", f"corpus={a.corpus}", "corpus.noise_p=0.0", "out_dir=${paths.data_dir}/demo_nonoise",
              "~corpus.splits.test", "~corpus.splits.test_counter"]),
            ("reference_nonoise", art / "reference_nonoise" / "model.safetensors",
             ["prior.cli.train_ref", "--config-name", "train_ref_base", *common, "data.shards.train=${paths.data_dir}/demo_nonoise/train",
              "data.shards.val=${paths.data_dir}/demo_nonoise/val", "export_dir=${paths.artifacts_dir}/demo/reference_nonoise"]),
            ("weights_nonoise", data / "demo_nonoise" / "train" / "00000.prior.npz",
             ["prior.cli.weights", "reference=${paths.artifacts_dir}/demo/reference_nonoise",
              "shards=[${paths.data_dir}/demo_nonoise/train,${paths.data_dir}/demo_nonoise/val]"]),
        ]
    run_stages(py, stages, logs, env)


def run_stages(py: str, stages: list[tuple[str, Path, list[str]]], logs: Path, env: dict[str, str]) -> None:
    """Run each stage (name, the file it writes, module and overrides) unless its file exists."""
    for name, done, args in stages:
        if done.exists():
            print(f"  cached: {done.relative_to(ROOT)}", flush=True)
            continue
        sh([py, "-m", *args, f"hydra.run.dir={logs}/{name}"], logs / f"{name}.log", env)


def train_jobs(py: str, jobs: dict[str, list[str]], runs: Path, steps: int, trainer: str, parallel: int,
               env: dict[str, str], extra: list[str] = ()) -> None:
    """``prior-train-lvlm`` for every job (name -> overrides) whose curve does not reach ``steps``
    yet, ``parallel`` at a time, each in ``runs/<name>`` with ``extra`` overrides last."""
    todo = {n: o for n, o in jobs.items() if not finished(runs / n, steps)}
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to run", flush=True)

    def one(item: tuple[str, list[str]]) -> None:
        name, overrides = item
        run_dir = runs / name
        args = [py, "-m", "prior.cli.train_lvlm", *overrides, f"trainer={trainer}",
                f"trainer.max_steps={steps}", *extra, f"hydra.run.dir={run_dir}"]
        sh(args, run_dir.parent / f"{run_dir.name}.log", env)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, todo.items()))


def run_jobs(py: str, jobs: dict[str, list[str]], a: argparse.Namespace, env: dict[str, str]) -> None:
    """Train every job (name -> overrides) not yet finished, ``a.parallel`` at a time."""
    train_jobs(py, jobs, Path(a.runs), a.steps, a.trainer, a.parallel, env)


def job(setting: str, loss: str, lr: str, seed: int, *extra: str) -> list[str]:
    return [f"experiment={SETTINGS[setting]}", f"loss={loss}", f"optimizer.lr={lr}", f"seed={seed}", *extra]


def select_lrs(protocol: Protocol, a: argparse.Namespace) -> dict[tuple[str, str], str]:
    """Per (setting, loss): the sweep's rate with the best final value of the selection metric."""
    metric = protocol.selection["metric"]
    best = {}
    for setting in a.settings:
        for loss in ("ntp", "prior"):
            scores = {}
            for lr in LRS[setting]:
                curve = load_curve(Path(a.runs) / f"{setting}/{loss}_lr{lr}_s0")
                scores[lr] = curve[metric][-1][1] if metric in curve else float("-inf")
            best[(setting, loss)] = max(scores, key=scores.get)
            print(f"  {setting} {loss}: {metric} by lr {scores} -> {best[(setting, loss)]}", flush=True)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="logs/paper_regimes")
    parser.add_argument("--results", default="experiments/results/paper_regimes")
    parser.add_argument("--settings", default="h,u", type=lambda s: s.split(","))
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--shared-seeds", default="0", type=lambda s: [int(x) for x in s.split(",")],
                        help="seeds at the shared rate (seed 0 comes from the sweep)")
    parser.add_argument("--ablation-seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--trainer", default="cpu")
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--no-noise-ablation", dest="noise_ablation", action="store_false")
    parser.add_argument("--machine", default=os.environ.get("MACHINE", "2-core CPU"))
    a = parser.parse_args(argv)
    py = sys.executable
    env = dict(os.environ, WANDB_MODE="offline")
    if a.parallel > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    protocol = Protocol.load("demo")
    start = time.time()

    print("== pre-trained parts", flush=True)
    prepare(py, a, env)

    print("== learning-rate sweep (seed 0)", flush=True)
    run_jobs(py, {f"{s}/{l}_lr{lr}_s0": job(s, l, lr, 0) for s in a.settings for l in ("ntp", "prior")
                  for lr in LRS[s]}, a, env)
    best = select_lrs(protocol, a)

    print("== seeds at each loss's own rate and at the shared rate; ablations", flush=True)
    jobs = {}
    for s in a.settings:
        gate = {lr: protocol.passes_gate([load_curve(Path(a.runs) / f"{s}/ntp_lr{lr}_s0")]) for lr in LRS[s]}
        if not any(ok for ok, _ in gate.values()):  # NTP reads the image at no rate: invalid, nothing more on it
            values = ", ".join(f"lr {lr}: {v:.3f}" for lr, (_, v) in gate.items())
            print(f"  {s}: NTP fails the validity gate at every rate ({protocol.gate['metric']} {values}; "
                  f"needed >= {protocol.gate['min']}): no seeds or ablations", flush=True)
            continue
        for l in ("ntp", "prior"):
            jobs.update({f"{s}/{l}_lr{best[(s, l)]}_s{seed}": job(s, l, best[(s, l)], seed) for seed in a.seeds})
            lr = SHARED_LR[s]
            jobs.update({f"{s}/{l}_lr{lr}_s{seed}": job(s, l, lr, seed) for seed in a.shared_seeds})
        lr = best[(s, "prior")]
        jobs.update({f"{s}/prior_alpha0.5_lr{lr}_s{seed}": job(s, "prior", lr, seed, "loss.alpha=0.5")
                     for seed in a.ablation_seeds})
        if a.noise_ablation:
            nonoise = ["data.shards.train=${paths.data_dir}/demo_nonoise/train",
                       "data.shards.val=${paths.data_dir}/demo_nonoise/val"]
            for l in ("ntp", "prior"):
                jobs.update({f"{s}/{l}_nonoise_lr{best[(s, l)]}_s{seed}": job(s, l, best[(s, l)], seed, *nonoise)
                             for seed in a.ablation_seeds})
    run_jobs(py, jobs, a, env)

    selection = {f"{s}/{l}": lr for (s, l), lr in best.items()}
    Path(a.runs, "selection.json").write_text(json.dumps({"selected_lr": selection, "shared_lr": SHARED_LR}, indent=2))
    print(f"== aggregate ({(time.time() - start) / 60:.0f} min so far)", flush=True)
    sh([py, str(ROOT / "experiments" / "aggregate_regimes.py"), a.runs, "--out", a.results, "--machine", a.machine,
        "--steps", str(a.steps)], Path(a.runs) / "aggregate.log", env)
    print((Path(a.results) / "README.md").read_text())


if __name__ == "__main__":
    main()
