"""Stage 2's data: the shards still to score, one item per shard, each read exactly once.

The unit of work is a shard. ``ShardCaptions`` is an iterable dataset that splits the shards over
every reader (ranks x DataLoader workers, as ``ShardStream`` does), so Lightning injects no
distributed sampler and no shard is split twice or scored twice; a reader with no shard yields
nothing. Images are not decoded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from prior.data.pipeline import SampleDecoder, SkipCounter, raw_samples, reader_slot
from prior.data.shards import resolve_shards
from prior.data.sidecars import is_complete, sidecar_path
from prior.data.tokenization import encode_caption, fingerprint, load_tokenizer


class ShardCaptions(IterableDataset):
    """One item per shard of this reader: its url, sample keys and caption ids."""

    def __init__(self, urls: Sequence[str], decoder: SampleDecoder, ranks: tuple[int, int] | None = None) -> None:
        self.urls = list(urls)
        self.decoder = decoder
        self.ranks = ranks  # (rank, world size) as the main process sees them

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = reader_slot(self.ranks)
        for url in self.urls[slot::slots]:
            yield self.read(url)

    def read(self, url: str) -> dict[str, Any]:
        """The captions of one shard (bad samples skipped and counted)."""
        keys, ids = [], []
        for raw in raw_samples([url], self.decoder.counter):
            sample = self.decoder(raw)
            if sample is not None:
                keys.append(sample["key"])
                ids.append(sample["input_ids"])
        return {"url": url, "keys": keys, "input_ids": ids}


class ScoringData(L.LightningDataModule):
    """The shards of ``shards`` whose sidecar is missing or would not serve (another tokenizer,
    reference, shard content or a shorter ``max_length``)."""

    def __init__(
        self,
        shards: Any,
        tokenizer: str,
        *,
        reference: str,
        max_length: int = 256,
        num_workers: int = 0,
        sidecar_dir: str | None = None,
        allow_pipe: bool = False,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        self.fingerprint = fingerprint(self.tokenizer)
        self.reference = reference
        self.max_length = max_length
        self.num_workers = num_workers
        self.sidecar_dir = sidecar_dir
        self.counter = SkipCounter()
        self.all_urls = list(resolve_shards(shards, allow_pipe=allow_pipe).urls)
        if len({sidecar_path(u, sidecar_dir) for u in self.all_urls}) != len(self.all_urls):
            raise ValueError(f"Some of the {len(self.all_urls)} shards are listed twice; list each once.")
        self.todo = [u for u in self.all_urls if not self.done(u)]

    def done(self, url: str) -> bool:
        """Whether the shard's sidecar exists and serves this tokenizer, reference and length."""
        return is_complete(sidecar_path(url, self.sidecar_dir), self.fingerprint, self.reference,
                           shard_url=url, max_length=self.max_length)

    def predict_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        decoder = SampleDecoder(
            encode=partial(encode_caption, self.tokenizer, max_length=self.max_length),
            counter=self.counter,
            with_images=False,
        )
        per_rank = len(self.todo) // world
        return DataLoader(ShardCaptions(self.todo, decoder, (rank, world)), batch_size=None,
                          num_workers=min(self.num_workers, per_rank))
