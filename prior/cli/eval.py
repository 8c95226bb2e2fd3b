"""`prior-eval`: evaluate an exported LVLM on a benchmark's splits.

Loads ``model`` with ``prior.load``, evaluates each split of ``benchmark`` (a config of
``conf/benchmark/``, instantiated: any ``prior.eval.benchmarks.Benchmark``) with
``prior.eval.evaluator.evaluate``, prints the metric x split table, writes ``eval.json`` and
``eval.md`` into ``output_dir`` (the Hydra run folder) and logs ``eval/<split>/<metric>`` to the
loggers of the ``logger`` group, if any (``logger=wandb``: also ``eval/<split>/samples``, a
table of images, references, greedy captions and counter-prior choices). A progress bar per
split shows on a terminal.
"""

from __future__ import annotations

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import prior
from prior.cli._hydra import CONF_DIR
from prior.cli.common import instantiate_group
from prior.eval.benchmarks import Benchmark
from prior.eval.evaluator import EvalResult, evaluate, log_results, markdown_table, write_results
from prior.loggers import finish_runs


def run_eval(cfg: DictConfig) -> dict[str, EvalResult]:
    """Evaluate every split, print and write the table, log the metrics; return the results."""
    L.seed_everything(cfg.seed, verbose=False)
    lvlm, tokenizer = prior.load(cfg.model)
    benchmark: Benchmark = instantiate(with_model_preprocessing(cfg.benchmark, lvlm.preprocessing, cfg.model))
    splits = list(cfg.splits) if cfg.splits else list(benchmark.default_splits)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    lvlm.to(device)
    results: dict[str, EvalResult] = {}
    for split in splits:
        results[split] = evaluate(
            lvlm,
            tokenizer,
            benchmark.items(split, cfg.limit),
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            max_length=cfg.max_length,
            generate=cfg.generate,
            benchmark=benchmark,
            num_samples=cfg.table_samples,
            progress=f"eval {split}",
        )
        skipped = results[split].skipped
        print(f"{split}: {results[split].num_items} items" + (f", skipped {skipped}" if skipped else ""))
    json_path, md_path = write_results(results, cfg.output_dir)
    print(markdown_table(results))
    print(f"Results: {json_path} and {md_path}")
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_results(loggers, results)
    for logger in loggers:
        logger.finalize("success")
    finish_runs(loggers)
    return results


def with_model_preprocessing(benchmark: DictConfig, preprocessing: dict | None, model: str) -> DictConfig:
    """The benchmark config with ``image_size``/``resize`` left null filled in from the model's
    training preprocessing; an error when the model records none (an older export)."""
    benchmark = benchmark.copy()
    for key in ("image_size", "resize"):
        if key in benchmark and benchmark[key] is None:
            if not preprocessing or preprocessing.get(key) is None:
                raise ValueError(
                    f"{model} does not record the {key} it was trained with (exported before this was "
                    f"saved): give it, e.g. benchmark.{key}=" + ("224" if key == "image_size" else "center_crop")
                )
            benchmark[key] = preprocessing[key]
    return benchmark


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
