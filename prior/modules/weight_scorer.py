"""Stage 2: score every caption token with the frozen reference LM and write per-shard sidecars.

Run with ``Trainer.predict``. The unit of work is a shard: shards are split over ranks (and read
by DataLoader workers in parallel), each rank scores its shards in length-sorted micro-batches and
``SidecarWriter`` writes one sidecar per shard as soon as it is scored. Shards whose sidecar already
exists for the same tokenizer and reference LM are skipped, so a re-run resumes.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForCausalLM

from prior.data.pipeline import SampleDecoder, SkipCounter, raw_samples
from prior.data.sidecars import Sidecar, is_complete, read_meta, sidecar_path
from prior.data.shards import resolve_shards
from prior.data.tokenization import TEMPLATE_VERSION, encode_caption, fingerprint, load_tokenizer, special_ids
from prior.loss import token_weights
from prior.models.llm import DTYPES
from prior.modules.reference_lm import caption_logprobs


def reference_id(folder: str | Path) -> str:
    """A short content hash of a reference LM folder's config and weight files."""
    folder = Path(folder)
    if not folder.is_dir():
        return hashlib.sha256(str(folder).encode()).hexdigest()[:16]  # a hub name
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    for p in files:
        if p.name.startswith("tokenizer"):
            continue
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


class ShardCaptions(Dataset):
    """One item per shard: its sample keys and caption ids (images are not decoded)."""

    def __init__(self, urls: Sequence[str], decoder: SampleDecoder) -> None:
        self.urls = list(urls)
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> dict[str, Any]:
        keys, ids = [], []
        for raw in raw_samples([self.urls[i]], self.decoder.counter):
            sample = self.decoder(raw)
            if sample is not None:
                keys.append(sample["key"])
                ids.append(sample["input_ids"])
        return {"url": self.urls[i], "keys": keys, "input_ids": ids}


class ScoringData(L.LightningDataModule):
    """The shards still to score, split over ranks."""

    def __init__(
        self,
        shards: Any,
        tokenizer: str,
        *,
        reference: str,
        max_length: int = 128,
        num_workers: int = 0,
        sidecar_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        self.fingerprint = fingerprint(self.tokenizer)
        self.reference = reference
        self.max_length = max_length
        self.num_workers = num_workers
        self.sidecar_dir = sidecar_dir
        self.counter = SkipCounter()
        self.all_urls = list(resolve_shards(shards).urls)
        self.todo = [
            u for u in self.all_urls
            if not is_complete(sidecar_path(u, sidecar_dir), self.fingerprint, reference)
        ]

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        decoder = SampleDecoder(
            encode=partial(encode_caption, self.tokenizer, max_length=self.max_length),
            counter=self.counter,
            with_images=False,
        )
        return DataLoader(
            ShardCaptions(self.todo[rank::world], decoder),
            batch_size=None,
            num_workers=min(self.num_workers, max(len(self.todo[rank::world]), 1)),
        )


class WeightScorer(L.LightningModule):
    """Scores caption tokens with a frozen reference LM (a Hugging Face folder or hub name)."""

    def __init__(self, reference: str, micro_batch_size: int = 64, dtype: str = "float32") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AutoModelForCausalLM.from_pretrained(reference, dtype=DTYPES[dtype])
        self.model.eval().requires_grad_(False)
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

    def __init__(self, tokenizer_fingerprint: str, reference: str, reference_path: str, sidecar_dir: str | None) -> None:
        super().__init__(write_interval="batch")
        self.meta = {
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "template": TEMPLATE_VERSION,
            "reference": reference,
            "reference_path": reference_path,
            "alpha": 1.0,
        }
        self.sidecar_dir = sidecar_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        records = prediction["records"]
        tokens = sum(len(r[1]) for r in records)
        meta = {
            **self.meta,
            "shard": prediction["url"],
            "num_tokens": int(tokens),
            "weight_sum": float(sum(float(np.sum(r[3])) for r in records)),
            "created": time.time(),
        }
        Sidecar.build(records, meta).save(sidecar_path(prediction["url"], self.sidecar_dir))


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
