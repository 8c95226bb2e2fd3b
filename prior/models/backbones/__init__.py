"""Vision backbones of the LVLM, by exact id (the ``backbone`` config group's ``name``)."""

from __future__ import annotations

import inspect
from typing import Any

from prior.models.backbones.base import VisionBackbone
from prior.models.backbones.encoder_free import EncoderFree
from prior.models.backbones.visual_encoder import VisualEncoder

__all__ = ["BACKBONES", "EncoderFree", "VisionBackbone", "VisualEncoder", "build_backbone"]

BACKBONES: dict[str, type[VisionBackbone]] = {
    "visual_encoder": VisualEncoder,
    "encoder_free": EncoderFree,
}


def build_backbone(name: str, lm_dim: int, **cfg: Any) -> VisionBackbone:
    """The backbone registered as ``name``, projecting into an LM of width ``lm_dim``."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}: valid ids are {sorted(BACKBONES)}.")
    cls = BACKBONES[name]
    options = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "lm_dim")]
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ValueError(f"Backbone {name!r} got unknown options {unknown}: it accepts {options}.")
    return cls(lm_dim, **cfg)
