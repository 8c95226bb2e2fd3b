"""The benchmark interface: what evaluation needs from a benchmark, and the generic readers.

A ``Benchmark`` turns each of its splits into a stream of uniform ``EvalItem``s (an ``ItemStream``
that also carries the ``SkipCounter`` of the samples it skipped: a bad sample never crashes an
evaluation and is never dropped silently) and says how to read the model's output: which part of
a generated caption is compared with the references, how to parse it into objects, which
descriptions test the language prior, and the kind of each caption token. ``conf/benchmark/``
picks one by ``_target_``: ``demo`` (``prior.demo.benchmark.DemoBenchmark``) or
``coco_captions`` (``CocoCaptions``, below): COCO-caption-format annotations with an image
folder, reference = the image's first caption, all captions in ``meta["references"]``.
"""

from __future__ import annotations

import itertools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from transformers import PreTrainedTokenizerBase

from prior.data.pipeline import RESIZE_MODES, SkipCounter, image_to_tensor, resize_image, to_rgb


@dataclass
class EvalItem:
    """One evaluation item, whatever the benchmark.

    ``image`` is a float tensor [3, H, W] in [0, 1]; ``candidates`` maps an attribute to
    counterfactual descriptions that change it (empty lists or no keys where the benchmark has
    none); ``truth_objects`` are the image's objects (dicts with shape, color, size, position)
    or None where unknown; ``meta`` holds the benchmark's own fields.
    """

    key: str
    image: torch.Tensor
    reference: str
    candidates: dict[str, list[str]] = field(default_factory=dict)
    truth_objects: list[dict] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class ItemStream(Iterator[EvalItem]):
    """An iterator of ``EvalItem``s with the counts of the samples it skipped; ``total`` is how
    many items it holds at most when that is known before reading (progress bars), else None."""

    def __init__(self, items: Iterator[EvalItem], counter: SkipCounter, total: int | None = None) -> None:
        self._items = items
        self.counter = counter
        self.total = total

    def __next__(self) -> EvalItem:
        return next(self._items)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples per reason (``prior.data.pipeline.SKIP_REASONS``) so far."""
        return self.counter.totals()


class Benchmark(ABC):
    """What evaluation (``prior.eval.evaluator.evaluate``, ``prior-eval``, ``PeriodicEval``) needs
    from a benchmark. Only ``items`` is required; the other hooks default to "not available",
    and the metrics that need them are then left out."""

    #: The splits ``prior-eval`` evaluates when none are named.
    default_splits: tuple[str, ...] = ("test",)

    @abstractmethod
    def items(self, split: str, limit: int | None = None) -> ItemStream:
        """The first ``limit`` items (all when None) of ``split``."""

    def postprocess(self, generation: str) -> str:
        """The part of a generated caption that is compared with the references and parsed."""
        return generation.strip()

    def parse(self, text: str) -> list[dict] | None:
        """The objects ``text`` mentions (dicts with shape and optionally color, size, position)
        for the generation metrics against ``EvalItem.truth_objects``; None without a parser."""
        return None

    def prior_alternatives(self, item: EvalItem) -> list[str]:
        """Descriptions of ``item`` with a counter-prior attribute set to its prior value, each
        a choice against the reference (``prior_pick_rate``); none by default."""
        return []

    def token_labels(
        self, tokenizer: PreTrainedTokenizerBase, caption: str, meta: dict[str, Any], n: int
    ) -> list[tuple[str, ...]] | None:
        """The kinds each of the ``n`` scored tokens of ``caption`` counts under (``nll_<kind>``);
        None when the benchmark does not know token kinds."""
        return None


def limited(items: Iterator[EvalItem], limit: int | None) -> Iterator[EvalItem]:
    """The first ``limit`` items (all when None)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return itertools.islice(items, limit)


def capped(total: int | None, limit: int | None) -> int | None:
    """``ItemStream.total`` of a source of ``total`` items (None: unknown) read up to ``limit``."""
    if total is None or limit is None:
        return total
    return min(total, limit)


# --------------------------------------------------------------------------- COCO captions


def coco_caption_items(
    annotations_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    image_size: int = 32,
    resize: str = "center_crop",
    limit: int | None = None,
    counter: SkipCounter | None = None,
) -> ItemStream:
    """One item per image of a COCO-caption-format file, in the file's image order.

    ``reference`` is the image's first caption; ``meta`` has the image entry's fields plus
    ``references`` (all its non-empty captions, in file order). An image without captions is
    skipped as ``empty_caption``, an entry without id or file_name or a missing image file as
    ``missing_field``, an undecodable image as ``bad_image``.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"Unknown resize mode {resize!r}; choose one of {RESIZE_MODES}.")
    counter = counter if counter is not None else SkipCounter()
    path = Path(annotations_json)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise ValueError(
            f"{path} is not in the COCO captions format: need top-level 'images' and 'annotations'"
        )
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        text = str(ann.get("caption") or "").strip()
        if text:
            captions.setdefault(ann.get("image_id"), []).append(text)
    folder = Path(images_dir)

    def items() -> Iterator[EvalItem]:
        for entry in data["images"]:
            if "id" not in entry or "file_name" not in entry:
                counter.add(
                    "missing_field", str(path), f"image entry lacks id or file_name: {entry}"
                )
                continue
            where = f"image {entry['id']} ({entry['file_name']})"
            refs = captions.get(entry["id"], [])
            if not refs:
                counter.add("empty_caption", where, "no caption")
                continue
            file = folder / entry["file_name"]
            if not file.is_file():
                counter.add("missing_field", where, f"no image file {file}")
                continue
            try:
                with Image.open(file) as img:
                    img.load()
                    image = image_to_tensor(resize_image(to_rgb(img), image_size, resize))
            except Exception as err:  # PIL raises many types for bad bytes
                counter.add("bad_image", where, err)
                continue
            yield EvalItem(
                key=str(entry["id"]),
                image=image,
                reference=refs[0],
                meta={**entry, "references": refs},
            )

    return ItemStream(limited(items(), limit), counter, capped(len(data["images"]), limit))


class CocoCaptions(Benchmark):
    """COCO-caption-format benchmarks (``coco_caption_items``); ``annotations`` and ``images`` may
    name the split as ``{split}`` (e.g. ``/data/coco/captions_{split}.json``)."""

    default_splits = ("val",)

    def __init__(self, annotations: str | None, images: str | None, image_size: int = 32, resize: str = "center_crop") -> None:
        if not annotations or not images:
            raise ValueError(
                "benchmark=coco_captions needs benchmark.annotations (a captions json) and benchmark.images "
                "(its image folder); either may name the split as {split}."
            )
        self.annotations, self.images = annotations, images
        self.image_size, self.resize = image_size, resize

    def items(self, split: str, limit: int | None = None) -> ItemStream:
        return coco_caption_items(
            self.annotations.format(split=split), self.images.format(split=split), self.image_size, self.resize, limit
        )
