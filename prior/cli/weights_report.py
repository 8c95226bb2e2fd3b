"""`prior-weights-report`: mean weight per token kind and an HTML page of weighted captions.

The weights are those of the ``loss`` config (default ``prior``, alpha 1: the sidecars' own),
computed from the sidecars' reference log-probabilities by :mod:`prior.weighting`, so
``loss.alpha=0.5`` or ``loss.floor=0.1`` show what the loss will use.

Token kinds are the demo corpus's (``prior.demo.token_kinds``, from the spans in its json);
other data, without spans, gets the page and the overall mean weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from prior.cli._hydra import CONF_DIR
from prior.data.tokenization import load_tokenizer
from prior.demo.token_kinds import token_labels
from prior.config import to_plain
from prior.eval.token_weights import apply_weighting, render_html, scored_samples, weights_by_kind
from prior.weighting import build_weighting


def weights_report(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Compute the per-kind means, write the HTML page and a JSON beside it; return the means."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    shards = cfg.shards if isinstance(cfg.shards, str) else OmegaConf.to_container(cfg.shards, resolve=True)
    weighting = build_weighting(to_plain(cfg.loss))
    samples = list(scored_samples(shards, tokenizer, cfg.sidecar_dir, cfg.max_length, cfg.limit))
    samples = apply_weighting(samples, weighting, tokenizer, token_labels)
    stats = weights_by_kind(samples, tokenizer, token_labels)
    knobs = ", ".join(f"{k}={v}" for k, v in weighting.knobs.items() if k != "reference")
    formula = f"loss={weighting.name} ({weighting.scheme.doc}; {knobs})"
    page = render_html(samples[: cfg.html_examples], tokenizer, stats, cfg.out, formula)
    Path(page).with_suffix(".json").write_text(json.dumps(stats, indent=2))
    print(f"{'token kind':<14} {'mean weight':>11} {'tokens':>8}")
    for kind, v in sorted(stats.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{kind:<14} {v['mean']:>11.3f} {v['tokens']:>8}")
    print(f"Token-weight page: {page}")
    return stats


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="weights_report")
def main(cfg: DictConfig) -> None:
    weights_report(cfg)


if __name__ == "__main__":
    main()
