"""`prior-train-vision`: pre-train the demo's vision tower (stands in for CLIP) and export it.

Trains ``model`` (a VisionTowerPretraining) on the images of ``data`` (the base corpus, disjoint
from the LVLM's training split) and exports the tower as a timm folder at ``export_dir``; the
``demo_h`` recipe loads it frozen with ``backbone.timm_name=local-dir:<export_dir>``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from prior.cli._hydra import CONF_DIR
from prior.cli.common import train_and_export


def train_vision(cfg: DictConfig) -> dict[str, float]:
    """Train, export, and return the final metrics."""
    return train_and_export(cfg, "Vision tower")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_vision")
def main(cfg: DictConfig) -> None:
    metrics = train_vision(cfg)
    accs = {k: v for k, v in metrics.items() if k.startswith("val/")}
    print("Validation: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(accs.items())))


if __name__ == "__main__":
    main()
