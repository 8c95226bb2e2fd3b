"""`prior-demo` (`make demo`): corpus -> tokenizer -> reference LM -> weights -> LVLM trained with
NTP and with PRIOR (same seed, data order and budget) -> evaluation -> PRIOR vs NTP table.

Each stage composes its own root config (the same ones `make train-ref` etc. use), so the demo is
the pipeline a real run goes through, on the built-in shape-world corpus.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from prior.cli._hydra import CONF_DIR
from prior.cli.common import compose_config
from prior.cli.tokenizer import train_tokenizer
from prior.cli.train_lvlm import train_lvlm
from prior.cli.train_ref import train_reference
from prior.cli.weights import compute_weights
from prior.cli.weights_report import weights_report
from prior.data.demo_corpus import CorpusConfig, generate_corpus
from prior.eval.compare import KEY_METRICS, comparison_table, load_curve, plot_curves, plot_scaling

STAGES = 6


def _stage(i: int, text: str) -> float:
    print(f"\n=== [{i}/{STAGES}] {text} ===", flush=True)
    return time.perf_counter()


def run_demo(cfg: DictConfig) -> dict[str, float]:
    """Run every stage; print and return the PRIOR-vs-NTP average relative changes."""
    size, out = cfg.demo_size, Path(cfg.out_dir)
    common = [f"paths.root_dir={cfg.paths.root_dir}", f"seed={cfg.seed}"]
    start = time.perf_counter()

    _stage(1, f"demo corpus ({size.corpus})")
    corpus_cfg = compose_config("demo_data", [*common, f"corpus={size.corpus}"])
    data_dir = Path(corpus_cfg.out_dir)
    summary = generate_corpus(CorpusConfig(seed=cfg.seed, **corpus_cfg.corpus), data_dir)
    print(f"{sum(s['num_samples'] for s in summary['splits'].values())} samples in {data_dir} ({summary['seconds']:.1f} s)")

    _stage(2, "tokenizer")
    tok_cfg = compose_config("tokenizer", common)
    print(f"fingerprint {train_tokenizer(tok_cfg.shards, tok_cfg.out_dir, tok_cfg.vocab_size, tok_cfg.min_frequency)}")

    _stage(3, f"reference LM, text only ({size.ref_steps} steps)")
    run = [f"logger={cfg.logger}", f"data.batch_size={size.batch_size}", *size.extra]
    ref_cfg = compose_config(
        "train_ref",
        [*common, *run, f"trainer.max_steps={size.ref_steps}", f"trainer.val_check_interval={size.ref_steps}",
         f"paths.output_dir={out / 'reference'}"],
    )
    ref_metrics = train_reference(ref_cfg)
    print(f"reference validation perplexity {ref_metrics.get('val/ppl', float('nan')):.2f}")

    _stage(4, "token weights (stage 2) and the weights report")
    compute_weights(compose_config("weights", [*common, f"reference={ref_cfg.export_dir}"]))
    report_cfg = compose_config("weights_report", [*common, f"tokenizer={ref_cfg.export_dir}"])
    weights_report(report_cfg)

    runs = {}
    for i, loss in enumerate(("ntp", "prior"), start=5):
        _stage(i, f"LVLM ({cfg.backbone}) with the {loss.upper()} loss ({size.lvlm_steps} steps)")
        run_dir = out / f"lvlm_{loss}"
        train_lvlm(compose_config(
            "train_lvlm",
            [*common, *run, f"loss={loss}", f"backbone={cfg.backbone}",
             f"trainer.max_steps={size.lvlm_steps}", f"trainer.val_check_interval={size.lvlm_steps}",
             f"checkpoint_every={size.lvlm_steps}", f"paths.output_dir={run_dir}",
             "+callbacks.eval._target_=prior.eval.callback.PeriodicEval",
             f"+callbacks.eval.every_n_steps={size.eval_every}", f"+callbacks.eval.limit={size.eval_limit}",
             f"+callbacks.eval.data_dir={data_dir}"],
        ))
        runs[loss] = load_curve(run_dir)

    table, averages = comparison_table([runs["ntp"]], [runs["prior"]])
    curves = plot_curves({"NTP": [runs["ntp"]], "PRIOR": [runs["prior"]]}, KEY_METRICS, out / "curves.png",
                         title=f"PRIOR vs NTP, {cfg.backbone}, seed {cfg.seed}")
    scaling = plot_scaling({"NTP": [runs["ntp"]], "PRIOR": [runs["prior"]]},
                           "test_counter/choice_accuracy_color", out / "scaling.png")
    header = (
        f"# PRIOR vs NTP on the demo corpus\n\n{cfg.backbone} LVLM, {size.lvlm_steps} steps, seed {cfg.seed}, "
        f"evaluated every {size.eval_every} steps on {size.eval_limit} images per split. 'final' is the "
        "last checkpoint; 'AUC' the mean over the learning curve; 'change' is PRIOR relative to NTP "
        "(positive = PRIOR better, whichever way the metric points).\n\n"
    )
    (out / "results.md").write_text(header + table + "\n")
    print("\n" + table)
    print(f"\nToken-weight page: {report_cfg.out}\nCurves: {curves}\nScaling: {scaling}\nTable: {out / 'results.md'}")
    color = "test_counter/choice_accuracy_color"
    ntp_c, prior_c = (runs[k].get(color, [(0, float('nan'))])[-1][1] for k in ("ntp", "prior"))
    print(
        f"\nDemo finished in {(time.perf_counter() - start) / 60:.1f} min: PRIOR vs NTP average relative change "
        f"{averages['final']:+.1%} at the last step, {averages['auc']:+.1%} over the learning curve; "
        f"colour choice on counter-prior images {ntp_c:.2f} (NTP) -> {prior_c:.2f} (PRIOR)."
    )
    return averages


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
