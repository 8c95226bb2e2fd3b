"""`prior-weights`: stage 2, score caption tokens with the reference LM and write sidecars."""

from __future__ import annotations

import time

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prior.callbacks import SkipReport
from prior.cli._hydra import CONF_DIR
from prior.data.scoring import ScoringData
from prior.models.reference import reference_id
from prior.modules.weight_scorer import SidecarWriter, WeightScorer, summarize


def compute_weights(cfg: DictConfig) -> dict[str, float]:
    """Score the shards that have no up-to-date sidecar; return the summary over all of them."""
    ref = reference_id(cfg.reference)
    shards = OmegaConf.to_container(cfg.shards, resolve=True) if not isinstance(cfg.shards, str) else cfg.shards
    data = ScoringData(
        shards,
        cfg.reference,
        reference=ref,
        max_length=cfg.max_length,
        num_workers=cfg.num_workers,
        sidecar_dir=cfg.sidecar_dir,
        allow_pipe=bool(cfg.get("allow_pipe", False)),
    )
    start = time.time()
    if data.todo:
        writer = SidecarWriter(data.fingerprint, ref, str(cfg.reference), cfg.sidecar_dir, cfg.max_length)
        trainer = instantiate(cfg.trainer, callbacks=[writer, SkipReport()])
        model = WeightScorer(cfg.reference, cfg.micro_batch_size, cfg.dtype)
        trainer.predict(model, datamodule=data, return_predictions=False)
        trainer.strategy.barrier("prior-weights")  # every rank's sidecars are written
        if not trainer.is_global_zero:
            return {}
        missing = [u for u in data.todo if not data.done(u)]
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) were not scored (first: {missing[0]}); see the log above.")
    summary = summarize(data.all_urls, cfg.sidecar_dir, since=start, seconds=time.time() - start)
    print(
        f"Weights: {summary['shards']} shards ({summary['shards_scored_now']} scored now, "
        f"{summary['shards'] - summary['shards_scored_now']} already done), {summary['samples']} samples, "
        f"{summary['tokens']} tokens, {summary['tokens_per_s']:.0f} tokens/s, "
        f"mean weight {summary['mean_weight']:.3f} (tokenizer {data.fingerprint}, reference {ref})"
    )
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="weights")
def main(cfg: DictConfig) -> None:
    compute_weights(cfg)


if __name__ == "__main__":
    main()
