"""PRIOR: token-weighted next-token prediction for vision-language pre-training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from prior.models.lvlm import LVLM

__version__ = "0.1.0"


def load(path: str | Path) -> tuple[LVLM, PreTrainedTokenizerBase]:
    """Load an LVLM exported with ``LVLM.save_pretrained`` and its tokenizer, for inference."""
    from prior.models.lvlm import load_lvlm

    return load_lvlm(path)
