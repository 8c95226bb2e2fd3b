"""`prior-train-ref`: stage 1, pre-train the text-only reference LM on captions.

Trains ``model`` (a ReferenceLM) on the captions of ``data``, logs validation perplexity, and
exports the final LM with its tokenizer as a Hugging Face folder at ``export_dir``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from prior.cli._hydra import CONF_DIR
from prior.cli.common import train_and_export
from prior.cli.objective import objective, train_trial


def train_reference(cfg: DictConfig) -> dict[str, float]:
    """Train, export, and return the final metrics."""
    return train_and_export(cfg, "Reference LM")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_ref")
def main(cfg: DictConfig) -> float | None:
    """Returns the final val/loss, the mean caption NLL (or ``optimized_metric``: the value
    ``hparams_search`` optimises)."""
    metrics = train_trial(train_reference, cfg)
    if "val/ppl" in metrics:
        print(f"Validation perplexity: {metrics['val/ppl']:.2f}")
    return objective(metrics, cfg, default="val/loss")


if __name__ == "__main__":
    main()
