"""Benchmark readers: every benchmark becomes a stream of uniform ``EvalItem``s.

A reader returns an ``ItemStream``: an iterator of items that also carries the ``SkipCounter``
of the samples it skipped (bad or missing images, missing fields), so a bad sample never crashes
an evaluation and is never dropped silently. ``BENCHMARKS`` names the readers;
``load_benchmark(name, **kwargs)`` opens one by name.

* ``demo``: the shape-world demo corpus (``prior.data.demo_corpus``): reference = the grammar
  description, candidates = one-attribute counterfactuals, truth objects from the json.
* ``coco_captions``: COCO-caption-format annotations (``{"images": [{"id", "file_name", ...}],
  "annotations": [{"image_id", "caption"}, ...]}``) with an image folder: reference = the
  image's first caption, all captions in ``meta["references"]``; no candidates, no truth.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from prior.data.demo_corpus import TYPICAL_COLOR, counterfactual_descriptions, describe
from prior.data.pipeline import (
    RESIZE_MODES,
    SampleDecoder,
    SkipCounter,
    image_to_tensor,
    raw_samples,
    resize_image,
    to_rgb,
)
from prior.data.shards import resolve_shards
from prior.eval.metrics import CHOICE_ATTRIBUTES

_DEMO_FIELDS = ("objects", "description", "cue_first")


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
    """An iterator of ``EvalItem``s with the counts of the samples it skipped."""

    def __init__(self, items: Iterator[EvalItem], counter: SkipCounter) -> None:
        self._items = items
        self.counter = counter

    def __next__(self) -> EvalItem:
        return next(self._items)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples per reason (``prior.data.pipeline.SKIP_REASONS``) so far."""
        return self.counter.totals()


def _limited(items: Iterator[EvalItem], limit: int | None) -> Iterator[EvalItem]:
    """The first ``limit`` items (all when None)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return itertools.islice(items, limit)


# --------------------------------------------------------------------------- demo corpus


def typical_color_counterfactuals(meta: dict) -> list[str]:
    """For each counter-prior object of a demo sample (left to right), its description with that
    object's colour replaced by its shape's typical colour: the choice ``prior_pick_rate`` scores.

    Each is also among ``counterfactual_descriptions(meta, "color")``.
    """
    objects = [{k: o[k] for k in ("shape", "color", "size", "position")} for o in meta["objects"]]
    variants = []
    for i, obj in enumerate(objects):
        typical = TYPICAL_COLOR[obj["shape"]]
        if obj["color"] != typical:
            changed = [{**o, "color": typical} if j == i else o for j, o in enumerate(objects)]
            variants.append(describe(changed, meta["cue_first"]))
    return variants


def demo_items(
    shards: str | os.PathLike | list[str],
    image_size: int = 32,
    resize: str = "center_crop",
    limit: int | None = None,
    counter: SkipCounter | None = None,
) -> ItemStream:
    """Items of demo-corpus shards (a split folder, a brace pattern or a list), in shard order.

    Candidates hold ``counterfactual_descriptions`` for colour, shape, count and position (every
    attribute present, possibly empty); ``meta`` is the sample's json. Samples without the demo
    fields (objects, description, cue_first) are skipped as ``missing_field``.
    """
    counter = counter if counter is not None else SkipCounter()
    urls = resolve_shards(shards if isinstance(shards, list) else str(shards)).urls
    decoder = SampleDecoder(
        encode=_no_tokens, counter=counter, image_size=image_size, resize=resize
    )

    def items() -> Iterator[EvalItem]:
        for raw in raw_samples(urls, counter):
            sample = decoder(raw)
            if sample is None:
                continue
            meta = sample["meta"]
            lacking = [f for f in _DEMO_FIELDS if f not in meta]
            if lacking:
                counter.add(
                    "missing_field", f"{sample['key']} in {sample['url']}", f"no {lacking} in json"
                )
                continue
            yield EvalItem(
                key=sample["key"],
                image=sample["image"],
                reference=meta["description"],
                candidates={a: counterfactual_descriptions(meta, a) for a in CHOICE_ATTRIBUTES},
                truth_objects=meta["objects"],
                meta=meta,
            )

    return ItemStream(_limited(items(), limit), counter)


def _no_tokens(text: str) -> list[int]:
    """Stands in for a tokenizer: evaluation items carry text, not token ids."""
    return []


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

    return ItemStream(_limited(items(), limit), counter)


# --------------------------------------------------------------------------- registry

BENCHMARKS: dict[str, Callable[..., ItemStream]] = {
    "demo": demo_items,
    "coco_captions": coco_caption_items,
}


def load_benchmark(name: str, **kwargs: Any) -> ItemStream:
    """Open benchmark ``name`` from ``BENCHMARKS`` with the reader's keyword arguments."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name](**kwargs)
