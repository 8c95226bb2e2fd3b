"""Stage 2: score every caption token with the frozen reference LM and write per-shard sidecars.

Run with ``Trainer.predict`` on ``prior.data.scoring.ScoringData``. The unit of work is a shard:
shards are split over ranks and DataLoader workers (each read exactly once), each rank scores its
shards in length-sorted micro-batches and ``SidecarWriter`` writes one sidecar per shard as soon as
it is scored. Shards whose sidecar already serves (same tokenizer, reference, shard and at least
this ``max_length``) are skipped, so a re-run resumes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from prior.data.sidecars import Sidecar, read_meta, shard_identity, sidecar_path
from prior.data.tokenization import TEMPLATE_VERSION, load_tokenizer, special_ids
from prior.loss import token_weights
from prior.models.reference import load_reference
from prior.modules.reference_lm import caption_logprobs


class WeightScorer(L.LightningModule):
    """Scores caption tokens with a frozen reference LM (a Hugging Face folder or hub name)."""

    def __init__(self, reference: str, micro_batch_size: int = 64, dtype: str = "float32") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_reference(reference, dtype=dtype)
        self.pad_id = special_ids(load_tokenizer(reference))[2]

    @torch.no_grad()
    def predict_step(self, shard: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        ids = shard["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for start in range(0, len(order), self.hparams.micro_batch_size):
            chunk = order[start : start + self.hparams.micro_batch_size]
            width = max(len(ids[i]) for i in chunk)
            batch = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(batch.shape, dtype=torch.bool)
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = torch.as_tensor(ids[i])
                mask[row, : len(ids[i])] = True
            logp = caption_logprobs(self.model, batch.to(self.device), mask.to(self.device)).cpu()
            w = token_weights(logp)
            for row, i in enumerate(chunk):
                n = len(ids[i]) - 1
                results[i] = (logp[row, :n].numpy(), w[row, :n].numpy())
        records = [
            (key, ids[i][1:], results[i][0], results[i][1]) for i, key in enumerate(shard["keys"])
        ]
        return {"url": shard["url"], "records": records}


# Batches are whole shards (batch_size=None), which Lightning cannot map to sample indices; the
# writer does not need them.
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader")


class SidecarWriter(BasePredictionWriter):
    """Writes each scored shard's sidecar atomically as soon as its batch is done."""

    def __init__(self, tokenizer_fingerprint: str, reference: str, reference_path: str, sidecar_dir: str | None,
                 max_length: int) -> None:
        super().__init__(write_interval="batch")
        self.meta = {
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "template": TEMPLATE_VERSION,
            "reference": reference,
            "reference_path": reference_path,
            "max_length": int(max_length),
            "alpha": 1.0,
        }
        self.sidecar_dir = sidecar_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        records = prediction["records"]
        tokens = sum(len(r[1]) for r in records)
        meta = {
            **self.meta,
            "shard": prediction["url"],
            **shard_identity(prediction["url"]),
            "num_tokens": int(tokens),
            "weight_sum": float(sum(float(np.sum(r[3])) for r in records)),
            "created": time.time(),
        }
        meta["rank"] = trainer.global_rank
        Sidecar.build(records, meta).save(sidecar_path(prediction["url"], self.sidecar_dir))
        print(f"scored {prediction['url']} ({len(records)} samples, {tokens} tokens) on rank {trainer.global_rank}",
              flush=True)


def summarize(urls: Sequence[str], sidecar_dir: str | None, since: float, seconds: float) -> dict[str, float]:
    """Totals over the sidecars of ``urls``; tokens/s over those written after ``since``."""
    metas = [read_meta(sidecar_path(u, sidecar_dir)) for u in urls]
    new = [m for m in metas if m["created"] >= since]
    tokens = sum(m["num_tokens"] for m in metas)
    return {
        "shards": len(metas),
        "shards_scored_now": len(new),
        "samples": sum(m["num_samples"] for m in metas),
        "tokens": tokens,
        "tokens_per_s": sum(m["num_tokens"] for m in new) / max(seconds, 1e-9),
        "mean_weight": sum(m["weight_sum"] for m in metas) / max(tokens, 1),
    }
