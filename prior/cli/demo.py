"""`prior-demo` (`make demo`): PRIOR against NTP in one of the paper's settings, on the built-in
shape world, from nothing to the pre-registered table.

corpus and base corpus -> tokenizer -> base LM (the stand-in for a pretrained LLM) -> vision
tower (the stand-in for CLIP; setting H only) -> reference LM (the base fine-tuned on the LVLM
captions) -> weights -> the LVLM of ``experiment=demo_<regime>`` trained with NTP and with PRIOR
(same seed and data order, each at its learning rate) -> the tables of ``conf/protocol/demo.yaml``.

Each stage composes its own root config (the same ones `make train-base` etc. use). The
pre-trained parts are cached: a part is trained again only when its config or an upstream part
changed (or with ``fresh=true``). The two LVLM runs train side by side, one thread each.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prior.cli._hydra import CONF_DIR
from prior.cli.common import compose_config
from prior.cli.demo_data import generate_from_config
from prior.cli.tokenizer import train_tokenizer
from prior.cli.train_base import train_base
from prior.cli.train_ref import train_reference
from prior.cli.train_vision import train_vision
from prior.cli.weights import compute_weights
from prior.cli.weights_report import weights_report
from prior.data.tokenization import fingerprint, load_tokenizer
from prior.eval.compare import Protocol, load_curve, plot_curves, plot_scaling, protocol_report

STAGE_FILE = "prior_stage.json"


class Stages:
    """Numbered stage headers and the time since the start."""

    def __init__(self, total: int) -> None:
        self.total, self.i, self.start = total, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.i += 1
        print(f"\n=== [{self.i}/{self.total}] {text} ===", flush=True)

    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


def _key(cfg: DictConfig, upstream: str) -> str:
    """What a trained part depends on: its model, data, optimisation and seed, and its inputs."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "optimizer", "scheduler")}
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer.pop("default_root_dir", None)
    blob = json.dumps([parts, trainer, cfg.seed, upstream], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_part(cfg: DictConfig, upstream: str, train: Callable[[DictConfig], dict], fresh: bool) -> str:
    """Train the part ``cfg`` describes unless its export holds the same key; return the key."""
    key = _key(cfg, upstream)
    marker = Path(cfg.export_dir) / STAGE_FILE
    if not fresh and marker.exists() and json.loads(marker.read_text()).get("key") == key:
        print(f"cached: {cfg.export_dir} (key {key}; fresh=true retrains it)")
        return key
    metrics = train(cfg)
    marker.write_text(json.dumps({"key": key, "metrics": metrics}, indent=2))
    return key


def train_side_by_side(runs: dict[str, list[str]], out: Path) -> None:
    """``prior-train-lvlm`` once per entry (name -> overrides), all at once, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for name, overrides in runs.items():
        log = (out / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "prior.cli.train_lvlm", *overrides],
                                        stdout=log, stderr=subprocess.STDOUT, env=env), log)
    for name, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        if code:
            raise RuntimeError(f"the {name} run failed ({code}); its log: {out / f'{name}.log'}:\n"
                               + (out / f"{name}.log").read_text()[-3000:])
        print(f"{name}: done ({out / f'{name}.log'})")


def run_demo(cfg: DictConfig) -> dict[str, float]:
    """Run every stage; print and return the average relative changes of PRIOR over NTP."""
    size, out, regime = cfg.demo_size, Path(cfg.out_dir), cfg.regime
    if regime not in ("h", "u"):
        raise ValueError(f"regime must be h (frozen tower and LM, projector only) or u (encoder-free), got {regime!r}")
    common = [f"paths.root_dir={cfg.paths.root_dir}", f"seed={cfg.seed}"]
    run = [f"logger={cfg.logger}", f"data.batch_size={size.batch_size}", *size.extra]
    stage = Stages(8 if regime == "h" else 7)

    stage(f"demo corpus and base corpus ({size.corpus})")
    for name, overrides in (("demo_data", common), ("demo_base_data", common[:1])):  # the base corpus keeps its seed
        summary = generate_from_config(compose_config(name, [*overrides, f"corpus={size.corpus}"]))
        print(f"{sum(s['num_samples'] for s in summary['splits'].values())} samples in {summary['out_dir']} "
              f"({summary['seconds']:.1f} s)")

    stage("tokenizer")
    tok_cfg = compose_config("tokenizer", common)
    train_tokenizer(tok_cfg.shards, tok_cfg.out_dir, tok_cfg.vocab_size, tok_cfg.min_frequency)
    tokenizer = fingerprint(load_tokenizer(tok_cfg.out_dir))
    print(f"fingerprint {tokenizer}")

    stage(f"base LM: text only, on the base corpus with verbal scenes ({size.base_steps} steps)")
    steps = lambda n: [f"trainer.max_steps={n}", f"trainer.val_check_interval={n}", f"checkpoint_every={n}"]  # noqa: E731
    base_cfg = compose_config("train_base", [*common, *run, *size.base_extra, *steps(size.base_steps),
                                             f"paths.output_dir={out / 'base'}"])
    base = cached_part(base_cfg, tokenizer, train_base, cfg.fresh)

    if regime == "h":
        stage(f"vision tower: attribute heads on the base corpus images ({size.vision_steps} steps)")
        vision_cfg = compose_config("train_vision", [*common, *run, *steps(size.vision_steps),
                                                     f"paths.output_dir={out / 'vision'}"])
        cached_part(vision_cfg, "", train_vision, cfg.fresh)

    stage(f"reference LM: the base LM fine-tuned on the LVLM captions, text only ({size.ref_steps} steps)")
    ref_cfg = compose_config("train_ref_base", [*common, *run, *steps(size.ref_steps),
                                                f"paths.output_dir={out / 'reference'}"])
    cached_part(ref_cfg, base, train_reference, cfg.fresh)

    stage("token weights (stage 2) and the weights report")
    compute_weights(compose_config("weights", [*common, f"reference={ref_cfg.export_dir}"]))
    report_cfg = compose_config("weights_report", [*common, f"tokenizer={ref_cfg.export_dir}"])
    weights_report(report_cfg)

    stage(f"LVLM ({regime.upper()}: experiment=demo_{regime}) with NTP and with PRIOR, side by side "
          f"({size.lvlm_steps} steps, lr NTP {cfg.lr[regime].ntp}, PRIOR {cfg.lr[regime].prior})")
    runs = {
        loss: [*common, *run, f"experiment=demo_{regime}", f"loss={loss}", f"optimizer.lr={cfg.lr[regime][loss]}",
               *steps(size.lvlm_steps), "callbacks.periodic_eval.splits=[test,test_counter]",  # no val: the rates are chosen
               f"callbacks.periodic_eval.every_n_steps={size.eval_every}",
               f"callbacks.periodic_eval.limit={size.eval_limit}", f"hydra.run.dir={out / f'lvlm_{loss}'}"]
        for loss in ("ntp", "prior")
    }
    train_side_by_side(runs, out)
    curves = {loss: [load_curve(out / f"lvlm_{loss}")] for loss in runs}

    stage("PRIOR against NTP under the pre-registered protocol (conf/protocol/demo.yaml)")
    protocol = Protocol.load("demo")
    report, averages = protocol_report(curves["ntp"], curves["prior"], protocol)
    groups = {"NTP": curves["ntp"], "PRIOR": curves["prior"]}
    plots = [plot_curves(groups, [*protocol.likelihood, *protocol.generation[:2]], out / "curves.png",
                         title=f"PRIOR vs NTP, setting {regime.upper()}, seed {cfg.seed}"),
             plot_scaling(groups, "test_counter/choice_accuracy_color", out / "scaling.png")]
    passed, gate_value = protocol.passes_gate(curves["ntp"])
    gate = (f"passed: NTP reads the image ({protocol.gate['metric']} {gate_value:.2f} >= {protocol.gate['min']})"
            if passed else
            f"FAILED: NTP does not read the image ({protocol.gate['metric']} {gate_value:.2f} < "
            f"{protocol.gate['min']}), so this comparison is invalid")
    header = (
        f"# PRIOR vs NTP on the demo corpus, setting {regime.upper()}\n\n`experiment=demo_{regime}`, "
        f"{size.lvlm_steps} steps, seed {cfg.seed}, evaluated every {size.eval_every} steps on {size.eval_limit} "
        f"images per split. Validity gate {gate}. One seed: for spread and each method at its own tuned "
        "learning rate see experiments/results/paper_regimes/.\n\n"
    )
    (out / "results.md").write_text(header + report + "\n")
    print(report)
    print(f"\nValidity gate {gate}.")
    print(f"Token-weight page: {report_cfg.out}\nCurves: {plots[0]}\nScaling: {plots[1]}\nTable: {out / 'results.md'}")
    color = "test_counter/choice_accuracy_color"
    final = {k: v[0].get(color, [(0, float("nan"))])[-1][1] for k, v in curves.items()}
    verdict = (
        f"PRIOR vs NTP average relative change {averages['likelihood_final']:+.1%} on the likelihood metrics at the "
        f"last step ({averages['likelihood_auc']:+.1%} over the learning curve), "
        f"{averages['generation_final']:+.1%} on the generation metrics"
        if averages else "no average: the comparison is invalid under the validity gate"
    )
    print(
        f"\nDemo finished in {stage.minutes():.1f} min. Setting {regime.upper()}: {verdict}; colour choice on "
        f"counter-prior images {final['ntp']:.2f} (NTP) -> {final['prior']:.2f} (PRIOR)."
    )
    return averages


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
