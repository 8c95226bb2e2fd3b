"""The kind of every caption token of the shape world, from the character spans in its json.

Span classes (``visual``, ``function``, ``boilerplate``, ``noise``, ``scene``) come from the
corpus; visual words are split further into shape words and colours that follow the shape's
prior (``color_typical``) or not (``color_counter``), and the EOS that closes a caption is ``eos``.
``token_labels`` is what the weights report (``prior-weights-report``) averages weights over
and what evaluation reports the NLL per (``nll_<kind>``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

KINDS = ("visual", "shape", "color_typical", "color_counter", "function", "boilerplate", "noise", "eos")


def span_kinds(caption: str, meta: dict[str, Any]) -> list[str | None]:
    """The kind of every character of ``caption`` (None where no span covers it)."""
    kinds: list[str | None] = [None] * len(caption)
    colors = iter(meta.get("objects", []))
    color_words = {o["color"] for o in meta.get("objects", [])}
    shape_words = {o["shape"] for o in meta.get("objects", [])}
    for span in meta.get("spans", []):
        kind = span["cls"]
        if kind == "visual" and span["text"] in shape_words:
            kind = "shape"
        elif kind == "visual" and span["text"] in color_words:
            obj = next(colors, None)
            kind = "color_counter" if obj and obj.get("counter_prior") else "color_typical"
        for c in range(span["start"], min(span["end"], len(caption))):
            kinds[c] = kind
    return kinds


def token_kinds(tokenizer: PreTrainedTokenizerBase, caption: str, meta: dict[str, Any], n: int) -> list[str | None]:
    """The kind of each of the first ``n`` scored tokens (caption tokens after BOS, then EOS): the
    kind of its first non-space character; a token of spaces alone belongs to the word after it."""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    chars = span_kinds(caption, meta)
    kinds: list[str | None] = []
    for start, end in enc["offset_mapping"]:
        first = next((c for c in range(start, len(caption)) if not caption[c].isspace()), None)
        kinds.append(chars[first] if first is not None else None)
    kinds.append("eos")
    return kinds[:n]


#: Kinds of visual word that also count as ``visual``.
VISUAL_KINDS = frozenset({"shape", "color_typical", "color_counter"})


def token_labels(tokenizer: PreTrainedTokenizerBase, caption: str, meta: dict[str, Any], n: int) -> list[tuple[str, ...]]:
    """The kinds each of the first ``n`` scored tokens counts under: its own kind, plus ``visual``
    for shape and colour words; none for a token no span covers."""
    kinds = token_kinds(tokenizer, caption, meta, n)
    kinds += [None] * (n - len(kinds))
    return [() if k is None else (k, "visual") if k in VISUAL_KINDS else (k,) for k in kinds]
