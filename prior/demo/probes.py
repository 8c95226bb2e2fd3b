"""Does a text-only LM read its context? The check that makes the demo's base LM a stand-in for a
pretrained LLM: given a verbal scene, it must name the colour the scene says, even against the
language prior.

For each counter-prior object of the first samples of a demo-corpus split, the LM reads the
description up to the object's "<shape> in" and is scored on the true colour word, once after a
verbal scene of the image and once without one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prior.data.pipeline import SkipCounter, raw_samples
from prior.data.shards import resolve_shards
from prior.data.tokenization import special_ids
from prior.demo.corpus import POSITIONS, describe, scene_text


def _prompts(meta: dict) -> list[tuple[str, str]]:
    """(description prefix up to a counter-prior object's colour, that colour) per such object."""
    objects = sorted(meta["objects"], key=lambda o: POSITIONS.index(o["position"]))
    description = describe(objects, cue_first=True)
    out, start = [], 0
    for obj in objects:
        cue = f"{obj['shape']} in "
        at = description.find(cue, start)
        start = at + len(cue)
        if obj["counter_prior"]:
            out.append((description[:start].rstrip(), obj["color"]))
    return out


@torch.no_grad()
def scene_reading(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split_dir: str | os.PathLike, limit: int = 200
) -> dict[str, float]:
    """Mean probability of the true colour of counter-prior objects, with and without the scene."""
    bos = special_ids(tokenizer)[0]
    probs: dict[str, list[float]] = {"with_scene": [], "without_scene": []}
    model.eval()
    seen = 0
    for raw in raw_samples(resolve_shards(str(Path(split_dir))).urls, SkipCounter()):
        if seen >= limit:
            break
        meta = json.loads(raw["json"])
        seen += 1
        for prefix, color in _prompts(meta):
            target = tokenizer(" " + color, add_special_tokens=False)["input_ids"][0]
            for key, text in (("with_scene", f"{scene_text(meta['objects'])} {prefix}"), ("without_scene", prefix)):
                ids = torch.tensor([[bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
                logits = model(input_ids=ids.to(model.device)).logits[0, -1].float()
                probs[key].append(logits.softmax(-1)[target].item())
    return {k: sum(v) / len(v) if v else float("nan") for k, v in probs.items()} | {"probes": len(probs["with_scene"])}
