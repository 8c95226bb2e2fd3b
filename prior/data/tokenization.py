"""Tokenization shared by every stage: one caption -> ids function, BOS/EOS policy, fingerprint.

The caption template (version ``TEMPLATE_VERSION``) is::

    [BOS] caption tokens [EOS]

``BOS`` is the tokenizer's ``bos_token`` (its ``eos_token`` when it has none, as GPT-2 does).
``EOS`` is appended only when the caption was not truncated. Every token after ``BOS`` is a
loss-bearing caption token: the reference LM scores exactly those, and the LVLM's loss covers
exactly those. Changing this policy changes ``TEMPLATE_VERSION`` and so every fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TEMPLATE_VERSION = "caption-v1"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load any Hugging Face tokenizer: a local folder, a hub name (hub needs network access) or
    the path of a ``.gguf`` file (the tokenizer stored in it, e.g. ``llm=smollm2``'s)."""
    try:
        tok = _load(str(name_or_path))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Cannot load a tokenizer from {name_or_path!r}: {err}\n"
            "Pass a folder written by `save_pretrained` (the demo's comes from `make tokenizer`), "
            "a hub name this machine can reach, or the path of a .gguf file."
        ) from err
    if tok.eos_token_id is None:
        raise ValueError(f"Tokenizer {name_or_path!r} has no eos_token; set one before training.")
    return tok


def _load(name_or_path: str) -> PreTrainedTokenizerBase:
    if not name_or_path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise OSError(f"no GGUF file at {path}")
    return copy.deepcopy(_load_gguf(str(path.resolve()), path.stat().st_mtime_ns))


@lru_cache(maxsize=4)
def _load_gguf(path: str, mtime_ns: int) -> PreTrainedTokenizerBase:
    """A GGUF file's tokenizer, parsed once per process (seconds each time otherwise)."""
    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """(bos, eos, pad) ids under the caption template's policy."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def encode_caption(
    tokenizer: PreTrainedTokenizerBase, caption: str, max_length: int | None = None
) -> list[int]:
    """Token ids of one caption: ``[BOS] ids [EOS]``, truncated to ``max_length`` ids in all.

    A truncated caption keeps BOS and its first ``max_length - 1`` tokens and gets no EOS.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (BOS + one token), got {max_length}")
    bos, eos, _ = special_ids(tokenizer)
    ids = [bos, *tokenizer.encode(caption, add_special_tokens=False), eos]
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
    return ids


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the tokenizer's serialized form, its special ids and the template version."""
    return _fingerprint_of(_serialized(tokenizer), special_ids(tokenizer))


@lru_cache(maxsize=32)
def _fingerprint_of(serialized: str, ids: tuple[int, int, int]) -> str:
    h = hashlib.sha256()
    h.update(serialized.encode())
    h.update(json.dumps({"special_ids": ids, "template": TEMPLATE_VERSION}).encode())
    return h.hexdigest()[:16]


def _serialized(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps(sorted(tokenizer.get_vocab().items()))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on ``texts`` with the template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)

