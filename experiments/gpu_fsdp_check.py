"""FSDP on a GPU, checked against the single-GPU preset on the same small model, data and seed.

    python experiments/gpu_fsdp_check.py --out experiments/results/fsdp_gpu

Builds the demo's stages 0-2 on a small corpus (shards, tokenizer, reference LM, weights), then
trains the LVLM with the PRIOR loss three ways for each backbone: ``trainer=gpu`` (bf16-mixed,
no sharding), ``trainer=fsdp`` and ``trainer=fsdp`` with activation checkpointing. Each run goes
through ``train_and_export`` (under FSDP: the full state dict gathered to rank 0, an unsharded
copy exported). It then reloads every export with ``prior.load`` and computes the NTP loss of the
same validation batches in fp32, and checks:

- the FSDP runs train like the plain run (train-loss curves and reloaded-export losses agree);
- the exports are whole: every parameter present, finite, trained ones moved from their init,
  frozen ones unchanged;
- peak GPU memory with and without activation checkpointing.

Writes ``fsdp_check.json`` and ``fsdp_check.md`` under ``--out``; exits non-zero when a check fails.
One GPU means a world size of 1: the gather is exercised, sharding over several ranks is not.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import prior  # noqa: E402
from prior.callbacks import SampleTable  # noqa: E402
from prior.cli.common import build_datamodule, compose_config, train_and_export  # noqa: E402

#: The model every run trains: the tiny_llama preset at width 128, 4 layers.
LLM = ["llm.config.hidden_size=128", "llm.config.intermediate_size=256", "llm.config.num_hidden_layers=4"]
DEVICE = "cuda"
STAGE_TRAINER = ["trainer=gpu"]
RUNS = {
    "gpu": ["trainer=gpu"],
    "fsdp": ["trainer=fsdp"],
    "fsdp_ac": ["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"],
    # the fsdp run resumed from its sharded checkpoint at half way (ckpt_path set in main)
    "fsdp_resumed": ["trainer=fsdp"],
}
BACKBONES = {
    # encoder-free: every parameter trained
    "encoder_free": ["backbone=encoder_free"],
    # visual encoder with the LLM frozen (frozen and trained parameters in one FSDP unit)
    "visual_encoder_frozen_llm": ["backbone=visual_encoder", "backbone.train=[projector]"],
}


class SampleProbe(SampleTable):
    """At ``at_step``, the sample table's generation (``SampleTable.collect``, the path it takes
    under FSDP) without a wandb logger; the captions go to ``samples.json`` in the run folder."""

    def __init__(self, at_step: int = 20) -> None:
        super().__init__(every_n_steps=at_step, num_samples=4, max_new_tokens=16)
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step != self.at_step:
            return
        rows = self.collect(trainer, pl_module, batch)
        if rows is not None:
            Path(trainer.default_root_dir, "samples.json").write_text(json.dumps([g for _, _, g in rows]))


def build_stages(root: Path, smoke: bool = False) -> None:
    from prior.cli.tokenizer import train_tokenizer
    from prior.cli.train_ref import train_reference
    from prior.cli.weights import compute_weights
    from prior.demo.corpus import CorpusConfig, generate_corpus

    data = root / "data" / "demo"
    splits = {"train": {"num_samples": 3000, "num_shards": 4}, "val": {"num_samples": 256, "num_shards": 2},
              "test": {"num_samples": 64, "num_shards": 2}, "test_counter": {"num_samples": 64, "num_shards": 2}}
    generate_corpus(CorpusConfig(seed=0, splits=splits), data)
    train_tokenizer(str(data / "train"), str(data / "tokenizer"), vocab_size=512, min_frequency=2)
    train_reference(compose(root, "train_ref", [*LLM, STAGE_TRAINER[0], f"trainer.max_steps={5 if smoke else 200}",
                                                 f"trainer.val_check_interval={5 if smoke else 200}", "data.batch_size=32",
                                                 "scheduler.num_warmup_steps=20", "optimizer.lr=3e-3"]))
    compute_weights(compose(root, "weights", ["num_workers=0"]))


def compose(root: Path, name: str, overrides: list[str]):  # noqa: ANN201
    logger = [] if name == "weights" else ["logger=csv"]
    return compose_config(name, [f"paths.root_dir={root}", f"paths.output_dir={root}/runs/{name}", *logger, *overrides])


def lvlm_cfg(root: Path, backbone: str, run: str, steps: int):  # noqa: ANN201
    return compose(root, "train_lvlm", [
        *BACKBONES[backbone], *RUNS[run], *LLM, "loss=prior", "data.batch_size=32", "data.eval_batch_size=64",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", f"checkpoint_every={steps // 2}",
        "+callbacks.sample_probe._target_=__main__.SampleProbe", f"+callbacks.sample_probe.at_step={steps // 3}",
        "scheduler.num_warmup_steps=5", "optimizer.lr=3e-3", "seed=0", "data.num_workers=2",
        f"paths.output_dir={root}/runs/{backbone}/{run}",
    ])


def train_losses(output_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(next(output_dir.glob("csv/version_*/metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@torch.no_grad()
def export_loss(cfg, export: Path, batches: list[dict]) -> float:  # noqa: ANN001
    """The NTP loss of ``batches`` under the exported LVLM, in fp32 on the GPU."""
    module = instantiate(cfg.model, _recursive_=False)
    module.model = prior.load(export)[0].float()
    module = module.to(DEVICE).eval()
    total = tokens = 0.0
    for batch in batches:
        batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
        r = module._losses(batch)
        total += float(r["ntp_sum"])
        tokens += float(r["tokens"])
    return total / tokens


def export_state(export: Path) -> dict[str, torch.Tensor]:
    return {k: v.float().cpu() for k, v in prior.load(export)[0].state_dict().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "experiments/results/fsdp_gpu"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--smoke", action="store_true",
                        help="check this script on a CPU: trainer=cpu only, a few steps, no FSDP")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE, args.steps = "cpu", min(args.steps, 6)
        RUNS.clear()
        RUNS["cpu"] = RUNS["cpu_resumed"] = ["trainer=cpu"]
        STAGE_TRAINER[0] = "trainer=cpu"
    elif not torch.cuda.is_available():
        sys.exit("This check needs a CUDA GPU (--smoke checks the script on a CPU).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="prior-fsdp-"))
    t0 = time.time()
    build_stages(root, smoke=args.smoke)
    print(f"stages 0-2 in {time.time() - t0:.0f} s", flush=True)

    results: dict = {"hardware": {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.processor(), "torch": torch.__version__,
                                  "python": platform.python_version()},
                     "steps": args.steps, "model": LLM, "backbones": {}}
    failures: list[str] = []
    for backbone in BACKBONES:
        cfg0 = lvlm_cfg(root, backbone, next(iter(RUNS)), args.steps)
        dm = build_datamodule(cfg0)
        dm.setup("validate")
        batches = [b for _, b in zip(range(2), dm.val_dataloader())]
        L.seed_everything(cfg0.seed, workers=True)  # as fit() does: the same init as every run
        build_datamodule(cfg0)
        fresh = instantiate(cfg0.model, _recursive_=False).model
        init = {k: v.detach().float().clone() for k, v in fresh.state_dict().items()}
        trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
        frozen = {n for n, p in fresh.named_parameters() if not p.requires_grad}
        rows = {}
        for run in RUNS:
            cfg = lvlm_cfg(root, backbone, run, args.steps)
            if run.endswith("_resumed"):
                source = run.removesuffix("_resumed")
                half = root / "runs" / backbone / source / "checkpoints" / f"step{args.steps // 2:06d}.ckpt"
                cfg.ckpt_path = str(half)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.time()
            metrics = train_and_export(cfg, f"LVLM ({backbone}, {run})")
            seconds = time.time() - start
            peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else math.nan
            export = Path(cfg.export_dir)
            state = export_state(export)
            missing = sorted(set(init) - set(state))
            bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
            moved = sum(1 for k in trained if k in state and not torch.equal(state[k], init[k]))
            frozen_changed = sorted(k for k in frozen if k in state and not torch.equal(state[k], init[k]))
            rows[run] = {
                "seconds": round(seconds, 1), "peak_mib": round(peak, 1),
                "val_ntp_loss_logged": metrics.get("val/ntp_loss"),
                "export_ntp_loss_fp32": export_loss(cfg, export, batches),
                "train_loss": train_losses(Path(cfg.paths.output_dir)),
                "params": len(state), "missing": len(missing), "non_finite": len(bad),
                "trained_moved": f"{moved}/{len(trained)}", "frozen_changed": len(frozen_changed),
                "samples": json.loads((Path(cfg.paths.output_dir) / "samples.json").read_text())
                if (Path(cfg.paths.output_dir) / "samples.json").exists() else None,
            }
            print(run, {k: v for k, v in rows[run].items() if k != "train_loss"}, flush=True)
            if missing or bad:
                failures.append(f"{backbone}/{run}: export missing {len(missing)}, non-finite {len(bad)}")
            if moved < len(trained):
                failures.append(f"{backbone}/{run}: only {moved}/{len(trained)} trained tensors moved")
            if frozen_changed:
                failures.append(f"{backbone}/{run}: {len(frozen_changed)} frozen tensors changed ({frozen_changed[0]})")
        base = rows[next(iter(RUNS))]
        for run in list(RUNS)[1:]:
            reference = rows[run.removesuffix("_resumed")] if run.endswith("_resumed") else base
            # the resumed run logs the second half only: compare it with the same steps
            curve = [abs(a - b) for a, b in zip(rows[run]["train_loss"][::-1], reference["train_loss"][::-1])]
            rows[run]["max_abs_train_loss_diff_vs_gpu"] = max(curve) if curve else math.nan
            ref_loss = reference["export_ntp_loss_fp32"]
            rel = abs(rows[run]["export_ntp_loss_fp32"] - ref_loss) / ref_loss
            rows[run]["export_loss_rel_diff_vs_gpu"] = rel
            if rel > 0.05:
                failures.append(f"{backbone}/{run}: reloaded export loss differs by {rel:.1%} from its reference")
            if not run.endswith("_resumed") and not rows[run]["samples"]:
                failures.append(f"{backbone}/{run}: the sample table generated nothing")
        results["backbones"][backbone] = rows
    results["failures"] = failures
    (out / "fsdp_check.json").write_text(json.dumps(results, indent=1))
    (out / "fsdp_check.md").write_text(report(results))
    print(report(results))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


def report(results: dict) -> str:
    hw = results["hardware"]
    lines = [f"FSDP check on {hw['gpu']} (torch {hw['torch']}), {results['steps']} steps, PRIOR loss, "
             f"tiny Llama width 128 x 4 layers, batch 32, bf16-mixed.", "",
             "| backbone | run | s | peak MiB | val NTP (logged, bf16) | export NTP (reloaded, fp32) | "
             "export vs reference | max train-loss diff vs reference | export tensors (missing / non-finite) | trained moved |"
             " frozen changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for backbone, rows in results["backbones"].items():
        for run, r in rows.items():
            lines.append(
                f"| {backbone} | {run} | {r['seconds']} | {r['peak_mib']} | {fmt(r['val_ntp_loss_logged'])} | "
                f"{fmt(r['export_ntp_loss_fp32'])} | {pct(r.get('export_loss_rel_diff_vs_gpu'))} | "
                f"{fmt(r.get('max_abs_train_loss_diff_vs_gpu'))} | {r['params']} ({r['missing']} / {r['non_finite']}) | "
                f"{r['trained_moved']} | {r['frozen_changed']} |")
    lines += ["", "The reference of `fsdp` and `fsdp_ac` is `gpu`; of `fsdp_resumed` (the `fsdp` run resumed from "
              "its sharded checkpoint at half way), the uninterrupted `fsdp` run, over the steps both trained.",
              "", "Failures: " + ("; ".join(results["failures"]) or "none"), ""]
    return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


if __name__ == "__main__":
    raise SystemExit(main())
