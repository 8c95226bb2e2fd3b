"""`prior-train-lvlm`: stage 3, train the LVLM with a token-weighted loss (`prior.weighting`) or plain NTP.

Trains ``model`` (an LVLMModule: ``backbone`` + ``llm`` + ``loss``) on ``data`` and exports the
final LVLM to ``export_dir`` for ``prior.load`` and ``prior-eval``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from prior.cli._hydra import CONF_DIR
from prior.cli.common import train_and_export
from prior.cli.objective import objective, train_trial


def train_lvlm(cfg: DictConfig) -> dict[str, float]:
    """Train, export, and return the final metrics."""
    return train_and_export(cfg, "LVLM")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_lvlm")
def main(cfg: DictConfig) -> float | None:
    """Returns the final val/ntp_loss (or ``optimized_metric``: the value ``hparams_search`` optimises)."""
    metrics = train_trial(train_lvlm, cfg)
    if "val/ntp_loss" in metrics:
        print(f"Validation NTP loss: {metrics['val/ntp_loss']:.4f}")
    return objective(metrics, cfg, default="val/ntp_loss")


if __name__ == "__main__":
    main()
