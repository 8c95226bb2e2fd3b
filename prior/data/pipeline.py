"""Streaming image-caption samples from WebDataset shards, robust to bad input.

A stream turns shards into decoded samples::

    {"key", "url", "caption", "input_ids", "meta", "image"?}

Bad input never crashes a run and is never dropped silently: a corrupt or truncated tar, an
undecodable image, an empty caption or a sample missing its fields is skipped and counted in a
``SkipCounter`` (shared memory, so counts made in DataLoader workers reach the main process),
and the first few of each kind are logged with their key and shard.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("corrupt_shard", "bad_image", "empty_caption", "missing_field", "bad_json")
#: Counted but kept: samples read (``read``), captions whose bytes were not UTF-8 (decoded with
#: replacement characters).
NOTE_REASONS = ("read", "caption_not_utf8")
RESIZE_MODES = ("center_crop", "resize", "pad", "none")
_MAX_WORKERS = 256
_LOG_FIRST = 3
_MAX_BAD_IN_A_ROW = 1000  # a training reader gives up after this many unusable images in a row


class SkipCounter:
    """Counts skipped samples per reason across DataLoader workers (one shared-memory row each)."""

    def __init__(self) -> None:
        self.table = torch.zeros(_MAX_WORKERS + 1, len(SKIP_REASONS) + len(NOTE_REASONS), dtype=torch.int64)
        self.table.share_memory_()

    def add(self, reason: str, where: str, err: object = "") -> None:
        """Count one skipped sample (or shard, for ``corrupt_shard``) and log the first few of each
        reason; a ``NOTE_REASONS`` reason counts a kept sample."""
        info = get_worker_info()
        row = 0 if info is None else info.id + 1
        col = (SKIP_REASONS + NOTE_REASONS).index(reason)
        self.table[row, col] += 1
        if reason != "read" and int(self.table[row, col]) <= _LOG_FIRST:
            log.warning("%s (%s) %s: %s", "kept" if reason in NOTE_REASONS else "skipped", reason, where, err)

    def totals(self) -> dict[str, int]:
        """Skips per reason, summed over workers."""
        sums = self.table.sum(0).tolist()
        return dict(zip(SKIP_REASONS, sums[: len(SKIP_REASONS)], strict=True))

    def notes(self) -> dict[str, int]:
        """Kept samples: ``read`` (every sample decoded and passed on) and repairs, summed over workers."""
        sums = self.table.sum(0).tolist()
        return dict(zip(NOTE_REASONS, sums[len(SKIP_REASONS):], strict=True))

    def skipped_samples(self) -> int:
        """Samples skipped (a corrupt shard counts once as a shard, not as samples)."""
        return sum(v for k, v in self.totals().items() if k != "corrupt_shard")

    def report(self) -> str:
        """One line summarising skipped and repaired input, or '' when there was none: the run's
        data report (read + skipped samples = the samples of the shards read to their end)."""
        totals = {k: v for k, v in {**self.totals(), **self.notes()}.items() if v and k != "read"}
        if not totals:
            return ""
        parts = ", ".join(f"{v} {k}" for k, v in totals.items())
        return (f"{self.summary()}; bad input: {parts} (the warnings above name the first keys and shards).")

    def summary(self) -> str:
        """``Data: N samples read, M skipped``."""
        return f"Data: {self.notes()['read']} samples read, {self.skipped_samples()} skipped"


# --------------------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB; alpha over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize by policy: ``center_crop`` (shorter side to size, then crop), ``resize`` (squash),
    ``pad`` (keep aspect, letterbox with black) or ``none`` (keep, but cap the longer side)."""
    if mode == "center_crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    if mode == "resize":
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "pad":
        return ImageOps.pad(img, (size, size), Image.Resampling.BICUBIC, color=(0, 0, 0))
    if mode == "none":
        if max(img.size) > size:
            img = ImageOps.contain(img, (size, size), Image.Resampling.BICUBIC)
        return img
    raise ValueError(f"Unknown resize mode {mode!r}; choose one of {RESIZE_MODES}.")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


# --------------------------------------------------------------------------- samples


@dataclass
class SampleDecoder:
    """Turns a raw WebDataset sample into a decoded one, or None (counted) when it is bad."""

    encode: Callable[[str], list[int]]
    counter: SkipCounter
    with_images: bool = True
    image_size: int = 32
    resize: str = "center_crop"
    # (url, key, input_ids) -> reference log-probs of input_ids[1:], from stage-2 sidecars
    join_weights: Callable[[str, str, list[int]], Any] | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"Unknown resize mode {self.resize!r}; choose one of {RESIZE_MODES}.")

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        sample = self.parse(raw)
        return None if sample is None else self.decode_image(sample)

    def parse(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """Everything but the pixels: caption, ids, meta, weights, and the image's encoded bytes
        (``image_bytes``) when images are wanted; None (counted) when the sample is bad."""
        raw = _fields_by_extension(raw)
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        where = f"{key} in {url}"
        if "txt" not in raw:
            self.counter.add("missing_field", where, "no txt caption")
            return None
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            self.counter.add("caption_not_utf8", where, err)
            caption = raw["txt"].decode("utf-8", errors="replace").strip()
        if not caption:
            self.counter.add("empty_caption", where, "empty caption")
            return None
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as err:
                self.counter.add("bad_json", where, err)
                return None
        sample: dict[str, Any] = {
            "key": key,
            "url": url,
            "caption": caption,
            "input_ids": self.encode(caption),
            "meta": meta,
        }
        if self.join_weights is not None:
            sample["ref_logprobs"] = self.join_weights(url, key, sample["input_ids"])
        if self.with_images:
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                self.counter.add("missing_field", where, f"no image ({'/'.join(IMAGE_EXTS)})")
                return None
            sample["image_bytes"] = raw[ext]
        return sample

    def decode_image(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """A parsed sample with its image decoded, resized and as a tensor (``image``); None
        (counted) when the bytes are not a usable image."""
        data = sample.pop("image_bytes", None)
        if data is None:
            self.counter.add("read", "")
            return sample
        try:
            with warnings.catch_warnings():
                # above PIL's pixel limit it only warns (and decodes, taking the memory): refuse it
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    rgb = resize_image(to_rgb(img), self.image_size, self.resize)
        except Exception as err:  # PIL raises many types for bad bytes (and DecompressionBombError)
            self.counter.add("bad_image", f"{sample['key']} in {sample['url']}", err)
            return None
        sample["image"] = image_to_tensor(rgb)
        self.counter.add("read", "")
        return sample


def _fields_by_extension(raw: dict[str, Any]) -> dict[str, Any]:
    """A sample whose key has dots (``a.v2.jpg``: WebDataset splits at the first dot, giving key
    ``a`` and fields ``v2.jpg``, ``v2.txt``) gets its fields back under their last extension and
    the dotted part back in its key."""
    fields = [k for k in raw if not k.startswith("__")]
    if not fields or all("." not in k for k in fields):
        return raw
    heads = {k.rsplit(".", 1)[0] for k in fields if "." in k}
    if len(heads) != 1 or any("." not in k for k in fields):
        return raw
    fixed = {k: v for k, v in raw.items() if k.startswith("__")}
    fixed["__key__"] = f"{raw.get('__key__', '')}.{heads.pop()}"
    fixed.update({k.rsplit(".", 1)[1]: v for k, v in raw.items() if not k.startswith("__")})
    return fixed


# --------------------------------------------------------------------------- streams


def reader_slot(ranks: tuple[int, int] | None = None) -> tuple[int, int]:
    """(index, count) of this reader among all ranks x DataLoader workers.

    ``ranks`` is (rank, world size) as the main process saw it when it built the loader: inside a
    DataLoader worker the process group may not be visible (a spawned worker has none), so the
    datasets record it instead of asking there. Without it, the process group is asked."""
    rank, world = ranks or (0, 1)
    if ranks is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world * workers


def check_shard_count(num_shards: int, world_size: int, num_workers: int, what: str) -> None:
    """Fail early when some reader would get no shard (it would hang or starve its rank)."""
    readers = world_size * max(num_workers, 1)
    if num_shards < readers:
        raise ValueError(
            f"{what} has {num_shards} shard(s) but {world_size} rank(s) x {max(num_workers, 1)} "
            f"worker(s) = {readers} readers; every reader needs at least one shard. Lower "
            "`data.num_workers` or write the data in more shards."
        )


def raw_samples(urls: Sequence[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples of the given shards in order. A shard that cannot be opened or read to its end
    is counted once as ``corrupt_shard`` and left; its complete samples before the damage are kept."""
    for url in urls:
        failed: list[Exception] = []

        def handler(err: Exception, failed: list[Exception] = failed, url: str = url) -> bool:
            if not failed:
                counter.add("corrupt_shard", url, err)
            failed.append(err)
            return False  # stop reading this shard

        yield from wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))
        if not failed and not _ends_like_a_tar(url):
            counter.add("corrupt_shard", url, "the file ends without the tar end-of-archive blocks: it was cut "
                        "at or inside a header, so its last samples are lost")


def _ends_like_a_tar(url: str) -> bool:
    """Whether a local tar ends as a whole tar does: a multiple of 512 bytes, the last 1024 of
    them zero (end of archive). A tar cut at or inside a member header reads as a shorter tar
    without error; this tells it apart. Remote shards are not checked."""
    if "://" in url or url.startswith("pipe:"):
        return True
    try:
        size = os.path.getsize(url)
        with open(url, "rb") as f:
            f.seek(max(size - 1024, 0))
            tail = f.read()
    except OSError:
        return True  # the reader has already counted a file that cannot be opened
    return size % 512 == 0 and size >= 1024 and not any(tail)


class ShardStream(IterableDataset):
    """Decoded samples from shards, split over ranks and DataLoader workers.

    ``mode="once"`` reads every sample exactly once across all readers, in shard order (validation,
    evaluation, weight scoring). ``mode="train"`` shuffles shards by ``(seed, epoch)`` and samples
    in a buffer, and gives every reader exactly ``samples_per_reader`` samples per epoch, cycling
    its shards if needed, so all ranks see the same number of batches. Its images are decoded after
    the shuffle buffer, so ``skip_samples`` (resume) skips without decoding any image; a sample whose
    image turns out bad is counted and replaced by the next one. Skipping counts positions, so a
    resumed reader repeats as many samples as it met bad images before the resume position.
    """

    def __init__(
        self,
        urls: Sequence[str],
        decoder: SampleDecoder,
        *,
        mode: str = "once",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_reader: int | None = None,
    ) -> None:
        if mode not in ("once", "train"):
            raise ValueError(f"mode must be 'once' or 'train', got {mode!r}")
        if mode == "train" and not samples_per_reader:
            raise ValueError("mode='train' needs samples_per_reader")
        self.urls = list(urls)
        self.decoder = decoder
        self.mode = mode
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_reader = samples_per_reader
        self.epoch = 0
        # Samples each reader skips at the start of the epoch (set by EpochLoader on resume).
        self.skip_samples = 0
        # (rank, world size), set by the datamodule in the main process (see ``reader_slot``).
        self.ranks: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = reader_slot(self.ranks)
        check_shard_count(len(self.urls), slots, 1, "This shard set")
        if self.mode == "once":
            yield from self._decoded(self.urls[slot::slots])
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = [self.urls[i] for i in rng.permutation(len(self.urls))]
        # Images are decoded after the shuffle, so skipping to a resume position decodes none.
        stream = self._passes(order[slot::slots], np.random.default_rng([self.seed, self.epoch, slot]))
        for _ in range(self.skip_samples):
            next(stream)
        left, failed = self.samples_per_reader - self.skip_samples, 0
        for parsed in stream:
            if left <= 0:
                return
            sample = self.decoder.decode_image(parsed)
            if sample is None:
                failed += 1
                if failed >= _MAX_BAD_IN_A_ROW:
                    raise RuntimeError(f"{failed} samples in a row had no usable image in shards {order[slot::slots]}; "
                                       "see the skip counts.")
                continue
            failed = 0
            left -= 1
            yield sample

    def _decoded(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        for raw in raw_samples(urls, self.decoder.counter):
            sample = self.decoder(raw)
            if sample is not None:
                yield sample

    def _parsed(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        for raw in raw_samples(urls, self.decoder.counter):
            sample = self.decoder.parse(raw)
            if sample is not None:
                yield sample

    def _passes(self, urls: Sequence[str], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Shuffled passes over this reader's shards (images not decoded yet), without end."""
        while True:
            produced = False
            for sample in _shuffled(self._parsed(urls), self.shuffle_buffer, rng):
                produced = True
                yield sample
            if not produced:
                raise RuntimeError(f"Shards {list(urls)} yielded no valid sample; see the skip counts.")


def _shuffled(
    stream: Iterator[dict[str, Any]], bufsize: int, rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    """Shuffle a stream with a fixed-size buffer and a seeded generator."""
    buf: list[dict[str, Any]] = []
    for sample in stream:
        buf.append(sample)
        if len(buf) >= bufsize:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()
