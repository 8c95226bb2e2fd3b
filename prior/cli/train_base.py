"""`prior-train-base`: pre-train the demo's base LM, the stand-in for a pretrained LLM.

The same text-only module as stage 1 (a ReferenceLM), trained on the base corpus: captions of a
corpus generated with its own seed (disjoint from the LVLM's training split), half of them
preceded by a verbal scene (``[scene] large circle red left ; ... [/scene] caption``), so the LM
learns to read its context and copy from it. Exported as a Hugging Face folder at ``export_dir``,
it initialises the reference LM (stage 1) and the LVLM's LM (``llm=demo_base``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from prior.cli._hydra import CONF_DIR
from prior.cli.common import train_and_export


def train_base(cfg: DictConfig) -> dict[str, float]:
    """Train, export, and return the final metrics."""
    return train_and_export(cfg, "Base LM")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_base")
def main(cfg: DictConfig) -> None:
    metrics = train_base(cfg)
    if "val/ppl" in metrics:
        print(f"Validation perplexity: {metrics['val/ppl']:.2f}")


if __name__ == "__main__":
    main()
