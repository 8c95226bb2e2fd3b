"""The one place a reference LM is loaded: stage 2 (sidecars) and the online weighting schemes.

A reference LM is a Hugging Face causal-LM folder (stage 1 exports one) or a hub name. It is
loaded frozen, in eval mode, in the asked dtype, and checked against the tokenizer of the data
it will score: a reference that tokenizes captions differently would score other tokens.
Its ``reference_id`` (a content hash of its config and weights) is recorded in every sidecar.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from prior.data.tokenization import fingerprint, load_tokenizer
from prior.models.llm import DTYPES


def reference_id(folder: str | Path) -> str:
    """A short content hash of a reference LM folder's config and weight files (of the name for
    a hub model)."""
    folder = Path(folder)
    if not folder.is_dir():
        return hashlib.sha256(str(folder).encode()).hexdigest()[:16]
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


def load_reference(
    path: str | Path, *, dtype: str = "float32", tokenizer: PreTrainedTokenizerBase | None = None
) -> nn.Module:
    """The frozen reference LM at ``path``; with ``tokenizer``, an error unless the reference's own
    tokenizer has the same fingerprint."""
    if dtype not in DTYPES:
        raise ValueError(f"Reference dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if tokenizer is not None:
        own = fingerprint(load_tokenizer(str(path)))
        if own != fingerprint(tokenizer):
            raise ValueError(
                f"The reference LM at {path} uses tokenizer {own}, the data is tokenized with "
                f"{fingerprint(tokenizer)}: both must tokenize captions the same way. Train the "
                "reference with this run's tokenizer (stage 1), or point the run at the reference's."
            )
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    return model.eval().requires_grad_(False)
