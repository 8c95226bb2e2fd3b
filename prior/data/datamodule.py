"""The LightningDataModule every stage uses: shards -> decoded samples -> padded batches.

A batch is a dict::

    input_ids       [B, L] long, caption ids under the template of ``prior.data.tokenization``
    attention_mask  [B, L] bool, False on padding
    images          [B, 3, H, W] float in [0, 1]           (when ``with_images``)
    image_mask      [B, H, W] bool, False on padding        (only when sizes differ in the batch)
    ref_logprobs    [B, L-1] float, reference log-probs of input_ids[:, 1:]   (when ``with_weights``)
    keys, urls, captions, meta                              lists of per-sample values
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from prior.data.pipeline import SampleDecoder, ShardStream, SkipCounter, check_shard_count
from prior.data.shards import ShardSet, resolve_shards
from prior.data.sidecars import WeightJoiner, shard_identity
from prior.data.tokenization import encode_caption, fingerprint, load_tokenizer, special_ids

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset with a length may yield more or fewer batches than it
# says under several workers; EpochLoader's length holds exactly (every reader yields the same
# number of samples), so the warning would only mislead.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

SPLITS = ("train", "val", "test", "predict")


def collate(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Pad captions (and images of different sizes) into one batch with masks."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    lengths = [len(s["input_ids"]) for s in samples]
    ids = torch.full((len(samples), max(lengths)), pad_id, dtype=torch.long)
    attn = torch.zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(samples):
        ids[i, : lengths[i]] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        attn[i, : lengths[i]] = True
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": attn,
        "keys": [s["key"] for s in samples],
        "urls": [s["url"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if "image" in samples[0]:
        images = [s["image"] for s in samples]
        if all(im.shape == images[0].shape for im in images):
            batch["images"] = torch.stack(images)
        else:
            h = max(im.shape[1] for im in images)
            w = max(im.shape[2] for im in images)
            batch["images"] = torch.zeros(len(images), 3, h, w)
            batch["image_mask"] = torch.zeros(len(images), h, w, dtype=torch.bool)
            for i, im in enumerate(images):
                batch["images"][i, :, : im.shape[1], : im.shape[2]] = im
                batch["image_mask"][i, : im.shape[1], : im.shape[2]] = True
    if "ref_logprobs" in samples[0]:
        ref = torch.zeros(len(samples), max(lengths) - 1)
        for i, s in enumerate(samples):
            ref[i, : lengths[i] - 1] = torch.as_tensor(s["ref_logprobs"], dtype=torch.float32)
        batch["ref_logprobs"] = ref
    return batch


def as_collated(batch: dict[str, Any]) -> dict[str, Any]:
    """A DataLoader collate_fn for batches that are already collated (handed over untouched)."""
    return batch


class EpochLoader(DataLoader):
    """A DataLoader over a training ShardStream: each ``iter()`` is a new data epoch with a fresh
    shard order, and ``resume_from`` restarts the stream inside an epoch (after a checkpoint)."""

    def __init__(self, dataset: ShardStream, *, batches_per_epoch: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batches_per_epoch = batches_per_epoch
        self.epoch = -1
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Make the next ``iter()`` continue data epoch ``epoch`` after ``batches_done`` batches."""
        self._resume = (epoch, batches_done)

    def __iter__(self):  # type: ignore[override]
        epoch, done = self._resume if self._resume else (self.epoch + 1, 0)
        self._resume = None
        self.epoch = epoch
        self.dataset.epoch = epoch
        # Each worker forms its own batches and the loader takes them round-robin from worker 0,
        # so resuming after `done` batches restarts at the last whole round and drops the rest.
        workers = max(self.num_workers, 1)
        rounds, extra = divmod(done, workers)
        self.dataset.skip_samples = rounds * self.batch_size
        iterator = super().__iter__()
        for _ in range(extra):
            next(iterator)
        return iterator


class ImageCaptionDataModule(L.LightningDataModule):
    """Streams image-caption shards (img2dataset layout) for every stage.

    ``with_images=False`` skips image decoding (the reference LM and weight scoring read captions
    only). ``shards`` maps a split (train, val, test, predict) to a shard spec: a folder, a brace
    pattern or a list (see ``prior.data.shards.resolve_shards``).
    """

    def __init__(
        self,
        shards: dict[str, Any],
        tokenizer: str,
        *,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        with_images: bool = True,
        image_size: int = 32,
        resize: str = "center_crop",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        pin_memory: bool = False,
        with_weights: bool = False,
        sidecar_dir: str | None = None,
        reshard_on_resume: bool = False,
        allow_pipe: bool = False,
        overfit_batches: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(shards) - set(SPLITS)
        if unknown:
            raise ValueError(f"Unknown split(s) {sorted(unknown)} in data.shards; use {SPLITS}.")
        self.shard_specs = {k: v for k, v in shards.items() if v}
        self.tokenizer_path = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.with_images = with_images
        self.image_size = image_size
        self.resize = resize
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.pin_memory = pin_memory
        self.with_weights = with_weights
        self.sidecar_dir = sidecar_dir
        self.reshard_on_resume = reshard_on_resume
        self.allow_pipe = allow_pipe
        self.overfit_batches = overfit_batches
        self.counter = SkipCounter()
        if not tokenizer:
            raise ValueError(
                "No tokenizer: data.tokenizer comes from recipe.tokenizer, which for recipe=img2dataset is the "
                "LLM's own (llm.name_or_path) and this LLM has none. Give one: recipe.tokenizer=<hub name or folder>."
            )
        self.tokenizer = load_tokenizer(tokenizer)
        self.pad_id = special_ids(self.tokenizer)[2]
        self.fingerprint = fingerprint(self.tokenizer)
        self._train_loader: EpochLoader | None = None
        self._pending_state: dict[str, int] | None = None

    # ------------------------------------------------------------------ building blocks

    def shard_set(self, split: str) -> ShardSet:
        """The resolved shards of a split, with a clear error when the split is not configured."""
        if split not in self.shard_specs:
            raise ValueError(
                f"No shards configured for split {split!r}: set data.shards.{split} to a folder, "
                "brace pattern or list of shards."
            )
        return resolve_shards(self.shard_specs[split], allow_pipe=self.allow_pipe)

    def decoder(self, shards: ShardSet, split: str) -> SampleDecoder:
        """The sample decoder of a split; joins train/val weights (checking every sidecar first)."""
        joiner = None
        if self.with_weights and split in ("train", "val"):
            joiner = WeightJoiner(self.fingerprint, self.sidecar_dir, self.max_length)
            for url in shards.urls:
                joiner.check(url)
        return SampleDecoder(
            encode=partial(encode_caption, self.tokenizer, max_length=self.max_length),
            counter=self.counter,
            with_images=self.with_images,
            image_size=self.image_size,
            resize=self.resize,
            join_weights=joiner,
        )

    def _world_size(self) -> int:
        return self._ranks()[1]

    def _ranks(self) -> tuple[int, int]:
        """(rank, world size) of this process, from the trainer (or (0, 1) without one)."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> EpochLoader | DataLoader:
        if self.overfit_batches:
            return self._overfit_loader()
        shards = self.shard_set("train")
        world = self._world_size()
        check_shard_count(len(shards), world, self.num_workers, "The train split")
        total = self.samples_per_epoch or shards.num_samples
        if total is None:
            raise ValueError(
                "The train shards have no manifest or img2dataset *_stats.json with sample counts; "
                "set data.samples_per_epoch to the number of training samples."
            )
        readers = world * max(self.num_workers, 1)
        per_reader_batches = total // (readers * self.batch_size)
        if per_reader_batches == 0:
            raise ValueError(
                f"{total} training samples are fewer than {readers} readers x batch size "
                f"{self.batch_size}; lower data.batch_size or data.num_workers."
            )
        dataset = ShardStream(
            shards.urls,
            self.decoder(shards, "train"),
            mode="train",
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            samples_per_reader=per_reader_batches * self.batch_size,
        )
        dataset.ranks = self._ranks()
        loader = EpochLoader(
            dataset,
            batches_per_epoch=per_reader_batches * max(self.num_workers, 1),
            **self._loader_kwargs(self.batch_size),
        )
        if self._pending_state is not None:
            loader.resume_from(**self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def _overfit_loader(self) -> DataLoader:
        """The first ``overfit_batches`` training batches, the same ones every epoch (a model that
        cannot fit them has a bug). The stream's own epochs reshuffle, so the batches are kept."""
        overfit, self.overfit_batches = self.overfit_batches, 0
        try:
            batches = list(itertools.islice(iter(self.train_dataloader()), overfit))
        finally:
            self.overfit_batches = overfit
        self._train_loader = None  # no data position to checkpoint
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=as_collated)

    def _once_loader(self, split: str) -> DataLoader:
        shards = self.shard_set(split)
        world = self._world_size()
        check_shard_count(len(shards), world, 1, f"The {split} split")
        dataset = ShardStream(shards.urls, self.decoder(shards, split), mode="once")
        dataset.ranks = self._ranks()
        # Read-once splits need no equal streams: use no more workers than a rank has shards.
        workers = min(self.num_workers, len(shards) // world)
        return DataLoader(dataset, **{**self._loader_kwargs(self.eval_batch_size), "num_workers": workers})

    def val_dataloader(self) -> DataLoader:
        return self._once_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._once_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._once_loader("predict")

    def _loader_kwargs(self, batch_size: int) -> dict[str, Any]:
        return {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "collate_fn": partial(collate, pad_id=self.pad_id),
            "pin_memory": self.pin_memory,
            "persistent_workers": False,
        }

    # ------------------------------------------------------------------ resume and reporting

    def layout(self) -> dict[str, Any]:
        """What decides which samples each training step reads: a resume must find the same."""
        shards = self.shard_set("train")
        ident = hashlib.sha256()
        for url in shards.urls:
            ident.update(url.split("/")[-1].encode())
            ident.update(str(shard_identity(url)["shard_bytes"]).encode())
        return {
            "world_size": self._world_size(),
            "num_workers": int(self.num_workers),
            "batch_size": int(self.batch_size),
            "seed": int(self.seed),
            "shuffle_buffer": int(self.shuffle_buffer),
            "samples_per_epoch": self.samples_per_epoch,
            "train_shards": f"{len(shards.urls)} shards, {ident.hexdigest()[:16]}",
        }

    def state_dict(self) -> dict[str, Any]:
        """The data position (the data epoch and the batches of it already trained on) and the
        layout it is a position in."""
        if self._train_loader is None:
            return {}
        done = 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # checkpoints are written in on_train_batch_end, before "completed" counts the batch
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._train_loader.epoch, "batches_done": int(done), "layout": self.layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the checkpoint's data position; a different layout is an error (it would
        replay or skip data) unless ``reshard_on_resume``, which starts the next data epoch."""
        if not state_dict:
            return
        epoch, done = int(state_dict["epoch"]), int(state_dict["batches_done"])
        saved, now = state_dict.get("layout"), self.layout()
        if saved != now:
            diff = ("no data layout (an older checkpoint)" if saved is None else
                    "; ".join(f"{k}: {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k]))
            if not self.reshard_on_resume:
                raise ValueError(
                    f"The checkpoint's data position belongs to another data layout ({diff}): resuming would "
                    "replay or skip training data. Resume with the same settings, or set "
                    "data.reshard_on_resume=true to continue from the start of the next data epoch."
                )
            log.warning("data layout changed on resume (%s): continuing at the start of data epoch %d", diff, epoch + 1)
            epoch, done = epoch + 1, 0
        self._pending_state = {"epoch": epoch, "batches_done": done}
