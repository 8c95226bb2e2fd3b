"""`prior-weights-report`: what the token weights look like on any data, as a page and as JSON.

The weights are those of the ``loss`` config (default ``prior``, alpha 1: the sidecars' own),
computed from the sidecars' reference log-probabilities by :mod:`prior.weighting`, so
``loss.alpha=0.5`` or ``loss.floor=0.1`` show what the loss will use.

On any shards with sidecars (img2dataset layout): the highest- and lowest-weight words among
those seen ``min_word_count`` times, the mean weight by word class and by token position, and a
page of thumbnails beside captions shaded word by word (``prior.eval.token_weights``). Token
kinds are the demo corpus's (``prior.demo.token_kinds``, from the spans in its json); other data
gets ``all`` and ``eos`` there. Writes ``out`` (the page), ``token_weights.json`` beside it (per
token kind, as before) and ``token_weights_words.json`` (the word statistics); with a ``logger``
(``logger=wandb``), logs the page, the tables and the means there too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from prior.cli._hydra import CONF_DIR
from prior.cli.common import instantiate_group
from prior.config import to_plain
from prior.data.shards import resolve_shards
from prior.data.tokenization import load_tokenizer
from prior.demo.token_kinds import token_labels
from prior.eval.token_weights import (
    add_words,
    apply_weighting,
    render_html,
    scored_samples,
    weights_by_kind,
    word_statistics,
)
from prior.loggers import finish_runs
from prior.weighting import build_weighting

WORDS_FILE = "token_weights_words.json"


def weights_report(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Compute the statistics, write the page and the JSON files beside it, log them to the
    configured loggers; return the per-kind means."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    shards = cfg.shards if isinstance(cfg.shards, str) else OmegaConf.to_container(cfg.shards, resolve=True)
    weighting = build_weighting(to_plain(cfg.loss))
    total = resolve_shards(shards).num_samples
    if cfg.limit is not None:
        total = min(total, cfg.limit) if total is not None else cfg.limit
    reading = scored_samples(shards, tokenizer, cfg.sidecar_dir, cfg.max_length, cfg.limit, images=cfg.html_examples)
    samples = list(tqdm(reading, total=total, desc="weights report: reading samples", unit="sample", disable=None))
    samples = apply_weighting(samples, weighting, tokenizer, token_labels)
    add_words(tqdm(samples, desc="weights report: grouping words", unit="sample", disable=None), tokenizer)
    stats = weights_by_kind(samples, tokenizer, token_labels)
    words = word_statistics(samples, cfg.min_word_count, cfg.top_words)
    knobs = ", ".join(f"{k}={v}" for k, v in weighting.knobs.items() if k != "reference")
    formula = f"loss={weighting.name} ({weighting.scheme.doc}; {knobs})"
    page = render_html(samples[: cfg.html_examples], tokenizer, stats, cfg.out, formula, words=words,
                       thumbnail_size=cfg.thumbnail_size)
    page.with_suffix(".json").write_text(json.dumps(stats, indent=2))
    page.with_name(WORDS_FILE).write_text(json.dumps(words, indent=2))
    print_words(words)
    print(f"{'token kind':<14} {'mean weight':>11} {'tokens':>8}")
    for kind, v in sorted(stats.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{kind:<14} {v['mean']:>11.3f} {v['tokens']:>8}")
    print(f"Token-weight page: {page}")
    log_report(instantiate_group(cfg.get("logger")), cfg, page, stats, words)
    return stats


def print_words(words: dict[str, Any]) -> None:
    """The word tables in the terminal: the highest and lowest words, classes and positions."""
    print(f"Words seen at least {words['min_count']} times ({len(words['words'])} of {words['distinct_words']}):")
    for title, rows in (("highest weight", words["highest"]), ("lowest weight", words["lowest"])):
        print(f"  {title}: " + ", ".join(f"{r['word']} {r['mean']:.2f} (x{r['count']})" for r in rows))
    print("  by word class: " + ", ".join(f"{c} {v['mean']:.3f}" for c, v in words["word_classes"].items()))
    print("  by token position: " + ", ".join(f"{b['positions']}: {b['mean']:.2f}" for b in words["position_buckets"]))


def log_report(loggers: list[Any], cfg: DictConfig, page: Path, stats: dict[str, dict[str, float]],
               words: dict[str, Any]) -> None:
    """Log the per-kind and per-class means to every logger; to wandb also the page
    (``weights_report/page``) and the tables (``weights_report/words``, ``/kinds``,
    ``/positions``, ``/word_classes``)."""
    if not loggers:
        return
    from lightning.pytorch.loggers import WandbLogger

    means = {f"weights_report/kind/{k}": v["mean"] for k, v in stats.items()}
    means |= {f"weights_report/class/{c}": v["mean"] for c, v in words["word_classes"].items()}
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(means)
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({
                "weights_report/page": wandb.Html(page.read_text(), inject=False),
                "weights_report/words": _wandb_table(
                    ["word", "count", "mean weight", "class"],
                    [(r["word"], r["count"], r["mean"], r["class"]) for r in words["words"]]),
                "weights_report/kinds": _wandb_table(
                    ["token kind", "mean weight", "tokens"], [(k, v["mean"], v["tokens"]) for k, v in stats.items()]),
                "weights_report/positions": _wandb_table(
                    ["position", "mean weight", "tokens"],
                    [(p["position"] + 1, p["mean"], p["tokens"]) for p in words["positions"]]),
                "weights_report/word_classes": _wandb_table(
                    ["class", "mean weight", "words"],
                    [(c, v["mean"], v["words"]) for c, v in words["word_classes"].items()]),
            })
        logger.finalize("success")
    finish_runs(loggers)


def _wandb_table(columns: list[str], rows: list[tuple]) -> Any:
    import wandb

    return wandb.Table(columns=columns, data=[list(r) for r in rows])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="weights_report")
def main(cfg: DictConfig) -> None:
    weights_report(cfg)


if __name__ == "__main__":
    main()
