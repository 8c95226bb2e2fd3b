"""The shape world as an evaluation benchmark (``conf/benchmark/demo.yaml``).

Items are the samples of a demo-corpus split: reference = the grammar description, candidates =
its one-attribute counterfactuals (colour, shape, count, position), truth objects from the json.
Generated captions are cut to their description (``demo_description``) and parsed with the
grammar's parser; the prior alternatives replace each counter-prior colour with its shape's
typical one; token kinds come from the json's spans.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from prior.data.pipeline import SampleDecoder, SkipCounter, raw_samples
from prior.data.shards import resolve_shards
from prior.demo.corpus import TYPICAL_COLOR, counterfactual_descriptions, describe, parse_description
from prior.demo.token_kinds import token_labels
from prior.eval.benchmarks import Benchmark, EvalItem, ItemStream, capped, limited
from prior.eval.metrics import CHOICE_ATTRIBUTES

_DEMO_FIELDS = ("objects", "description", "cue_first")
_DESCRIPTION = re.compile(r"\b(?:one|two|three) shapes?:", re.IGNORECASE)


class DemoBenchmark(Benchmark):
    """The splits of a demo corpus folder (``prior-demo-data``'s ``out_dir``)."""

    default_splits = ("test", "test_counter")

    def __init__(self, data_dir: str | os.PathLike, image_size: int = 32, resize: str = "center_crop") -> None:
        self.data_dir = Path(data_dir)
        self.image_size = image_size
        self.resize = resize

    def items(self, split: str, limit: int | None = None) -> ItemStream:
        return demo_items(self.data_dir / split, self.image_size, self.resize, limit=limit)

    def postprocess(self, generation: str) -> str:
        return demo_description(generation)

    def parse(self, text: str) -> list[dict]:
        return parse_description(text)

    def prior_alternatives(self, item: EvalItem) -> list[str]:
        return typical_color_counterfactuals(item.meta) if {"objects", "cue_first"} <= item.meta.keys() else []

    def token_labels(
        self, tokenizer: PreTrainedTokenizerBase, caption: str, meta: dict[str, Any], n: int
    ) -> list[tuple[str, ...]]:
        return token_labels(tokenizer, caption, meta, n)


def demo_description(text: str) -> str:
    """The description inside a demo web-style caption: from its count word ("one|two|three
    shape(s):") up to the first "." after it (or the end); the whole text, stripped, if there
    is no count word."""
    match = _DESCRIPTION.search(text)
    if match is None:
        return text.strip()
    end = text.find(".", match.end())
    return text[match.start() : end if end >= 0 else len(text)].strip()


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
    shard_set = resolve_shards(shards if isinstance(shards, list) else str(shards))
    urls = shard_set.urls
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

    return ItemStream(limited(items(), limit), counter, capped(shard_set.num_samples, limit))


def _no_tokens(text: str) -> list[int]:
    """Stands in for a tokenizer: evaluation items carry text, not token ids."""
    return []
