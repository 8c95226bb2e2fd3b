"""`prior-eval`: evaluate an exported LVLM on a benchmark's splits.

Loads ``model`` with ``prior.load``, evaluates each split of ``benchmark`` with
``prior.eval.evaluator.evaluate``, prints the metric x split table, writes ``eval.json`` and
``eval.md`` into ``output_dir`` (the Hydra run folder) and logs ``eval/<split>/<metric>`` to the
loggers of the ``logger`` group, if any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

import prior
from prior.cli._hydra import CONF_DIR
from prior.cli.common import instantiate_group
from prior.eval.benchmarks import BENCHMARKS, ItemStream, load_benchmark
from prior.eval.token_weights import nll_labels
from prior.eval.evaluator import EvalResult, demo_description, evaluate, markdown_table, write_results

#: Splits evaluated when ``splits`` is null.
DEFAULT_SPLITS: dict[str, list[str]] = {"demo": ["test", "test_counter"], "coco_captions": ["val"]}
#: How each benchmark's generated captions become the text compared with its references.
POSTPROCESS: dict[str, Callable[[str], str] | None] = {"demo": demo_description, "coco_captions": None}


def open_split(cfg: DictConfig, split: str) -> ItemStream:
    """The items of one split of ``cfg.benchmark``, with ``cfg.split`` (``${split}`` in the
    benchmark's paths) set to ``split``."""
    cfg = cfg.copy()
    cfg.split = split
    common: dict[str, Any] = {"image_size": cfg.image_size, "resize": cfg.resize, "limit": cfg.limit}
    if cfg.benchmark == "demo":
        return load_benchmark("demo", shards=cfg.demo.shards, **common)
    if cfg.benchmark == "coco_captions":
        if not cfg.coco.annotations or not cfg.coco.images:
            raise ValueError(
                "benchmark=coco_captions needs coco.annotations (a captions json) and coco.images "
                "(its image folder); either may refer to the split as ${split}."
            )
        return load_benchmark(
            "coco_captions", annotations_json=cfg.coco.annotations, images_dir=cfg.coco.images, **common
        )
    raise ValueError(f"Unknown benchmark {cfg.benchmark!r}; choose one of {sorted(BENCHMARKS)}.")


def run_eval(cfg: DictConfig) -> dict[str, EvalResult]:
    """Evaluate every split, print and write the table, log the metrics; return the results."""
    L.seed_everything(cfg.seed, verbose=False)
    splits = list(cfg.splits) if cfg.splits else DEFAULT_SPLITS.get(cfg.benchmark)
    if not splits:
        raise ValueError(f"No default splits for benchmark {cfg.benchmark!r}: pass `splits=[...]`.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    lvlm, tokenizer = prior.load(cfg.model)
    lvlm.to(device)
    results: dict[str, EvalResult] = {}
    for split in splits:
        results[split] = evaluate(
            lvlm,
            tokenizer,
            open_split(cfg, split),
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            max_length=cfg.max_length,
            generate=cfg.generate,
            postprocess=POSTPROCESS.get(cfg.benchmark),
            token_labels=nll_labels if cfg.benchmark == "demo" else None,
        )
        skipped = results[split].skipped
        print(f"{split}: {results[split].num_items} items" + (f", skipped {skipped}" if skipped else ""))
    json_path, md_path = write_results(results, cfg.output_dir)
    print(markdown_table(results))
    print(f"Results: {json_path} and {md_path}")
    loggers = instantiate_group(cfg.get("logger"))
    flat = {f"eval/{s}/{name}": v for s, r in results.items() for name, v in r.metrics.items()}
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(flat)
        logger.finalize("success")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
