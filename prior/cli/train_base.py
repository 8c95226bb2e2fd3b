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

from lightning.pytorch.utilities import rank_zero_only
from transformers import AutoModelForCausalLM

from prior.cli._hydra import CONF_DIR
from prior.cli.common import train_and_export
from prior.cli.objective import objective, train_trial
from prior.data.tokenization import load_tokenizer
from prior.demo.probes import scene_reading


def train_base(cfg: DictConfig) -> dict[str, float]:
    """Train, export, check that the exported LM reads a verbal scene (``prior.demo.probes``) and
    return the final metrics with that check's figures (``scene_reading/*``)."""
    metrics = train_and_export(cfg, "Base LM")
    if rank_zero_only.rank != 0:
        return metrics
    model = AutoModelForCausalLM.from_pretrained(cfg.export_dir)
    reading = scene_reading(model, load_tokenizer(cfg.export_dir), cfg.data.shards.val)
    print(
        f"Context reading, {reading['probes']} counter-prior objects of val: P(true colour) "
        f"{reading['with_scene']:.2f} after a verbal scene, {reading['without_scene']:.2f} without one"
    )
    return {**metrics, **{f"scene_reading/{k}": float(v) for k, v in reading.items()}}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_base")
def main(cfg: DictConfig) -> float | None:
    """Returns the final val/loss, the mean caption NLL (or ``optimized_metric``: the value
    ``hparams_search`` optimises)."""
    metrics = train_trial(train_base, cfg)
    if "val/ppl" in metrics:
        print(f"Validation perplexity: {metrics['val/ppl']:.2f}")
    return objective(metrics, cfg, default="val/loss")


if __name__ == "__main__":
    main()
