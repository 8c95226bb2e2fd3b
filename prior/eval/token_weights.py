"""What the reference LM's weights look like: mean weight per kind of token, and an HTML page.

Token kinds come from the character spans the demo corpus writes into each sample's json
(``visual``, ``function``, ``boilerplate``, ``noise``); visual words are split further into
shape words and colours that follow the shape's prior (``color_typical``) or not
(``color_counter``). Data without spans still gets the HTML page and the overall mean.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from prior.data.pipeline import SkipCounter, raw_samples
from prior.data.sidecars import SidecarError, load_sidecar, sidecar_path
from prior.data.shards import resolve_shards
from prior.data.tokenization import encode_caption

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
    """The kind of each of the first ``n`` scored tokens (caption tokens after BOS, then EOS)."""
    enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
    chars = span_kinds(caption, meta)
    kinds: list[str | None] = []
    for start, end in enc["offset_mapping"]:
        piece = [chars[c] for c in range(start, end) if not caption[c].isspace()]
        kinds.append(piece[0] if piece else None)
    kinds.append("eos")
    return kinds[:n]


#: The kinds of token the evaluation's per-kind NLL reports, and the token kinds each one pools.
NLL_KINDS: dict[str, frozenset[str]] = {
    "visual": frozenset({"visual", "shape", "color_typical", "color_counter"}),
    "color_counter": frozenset({"color_counter"}),
    "function": frozenset({"function"}),
    "boilerplate": frozenset({"boilerplate"}),
    "noise": frozenset({"noise"}),
    "eos": frozenset({"eos"}),
}


def nll_labels(tokenizer: PreTrainedTokenizerBase, caption: str, meta: dict[str, Any], n: int) -> list[tuple[str, ...]]:
    """The ``NLL_KINDS`` each of the first ``n`` scored tokens of ``caption`` counts under."""
    kinds = token_kinds(tokenizer, caption, meta, n)
    kinds += [None] * (n - len(kinds))
    return [tuple(label for label, members in NLL_KINDS.items() if kind in members) for kind in kinds]


def scored_samples(
    shards: Any, tokenizer: PreTrainedTokenizerBase, sidecar_dir: str | None, max_length: int, limit: int | None
) -> Iterator[dict[str, Any]]:
    """Samples joined with their sidecar entries, checked to have the same token ids."""
    counter = SkipCounter()
    seen = 0
    for url in resolve_shards(shards).urls:
        try:
            sidecar = load_sidecar(sidecar_path(url, sidecar_dir))
        except FileNotFoundError as err:
            raise SidecarError(f"No weight sidecar for {url}: run `make weights` (prior-weights).") from err
        for raw in raw_samples([url], counter):
            if limit is not None and seen >= limit:
                return
            key = raw["__key__"]
            if key not in sidecar or "txt" not in raw:
                continue
            caption = raw["txt"].decode("utf-8", errors="replace").strip()
            ids, logp, w = sidecar.get(key)
            if encode_caption(tokenizer, caption, max_length)[1:] != ids.tolist():
                raise SidecarError(f"Sample {key} of {url}: the sidecar's token ids differ from this tokenizer's.")
            meta = json.loads(raw["json"]) if "json" in raw else {}
            seen += 1
            yield {"key": key, "caption": caption, "ids": ids, "weights": w, "logprobs": logp, "meta": meta}


def weights_by_kind(samples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> dict[str, dict[str, float]]:
    """Mean weight and token count per kind, plus ``all``."""
    sums: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        kinds = token_kinds(tokenizer, s["caption"], s["meta"], len(s["ids"]))
        for kind, w in zip(kinds, s["weights"].tolist(), strict=False):
            sums["all"].append(w)
            if kind is not None:
                sums[kind].append(w)
                if kind in ("shape", "color_typical", "color_counter"):
                    sums["visual"].append(w)
    return {k: {"mean": float(np.mean(v)), "tokens": len(v)} for k, v in sums.items()}


def render_html(samples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, stats: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Write a page of captions with each token's background shaded by its weight."""
    rows = []
    for s in samples:
        cells = []
        for tok_id, w, lp in zip(s["ids"].tolist(), s["weights"].tolist(), s["logprobs"].tolist(), strict=True):
            text = html.escape(tokenizer.decode([tok_id])) or "&#9251;"
            cells.append(
                f'<span title="w={w:.2f}  p_ref={np.exp(lp):.2f}" '
                f'style="background: rgba(220,40,90,{w:.2f})">{text}</span>'
            )
        rows.append(f"<p><code>{html.escape(s['key'])}</code> {''.join(cells)}</p>")
    table = "".join(
        f"<tr><td>{k}</td><td>{v['mean']:.3f}</td><td>{v['tokens']}</td></tr>"
        for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["mean"])
    )
    page = f"""<!doctype html><meta charset="utf-8"><title>PRIOR token weights</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} span{{white-space:pre;padding:1px 0}}
td,th{{padding:2px 10px;text-align:left}}</style>
<h1>PRIOR token weights</h1>
<p>w = 1 - P_ref(token | previous tokens). Darker = larger weight = the text alone does not predict it,
so the image has to. Hover a token for its weight and reference probability.</p>
<table><tr><th>token kind</th><th>mean weight</th><th>tokens</th></tr>{table}</table>
{''.join(rows)}"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
