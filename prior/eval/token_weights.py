"""What the reference LM's weights look like: mean weight per kind of token, and an HTML page.

Token kinds come from a ``TokenLabels`` function (the demo's, ``prior.demo.token_kinds``, reads
the spans its corpus writes into each json); tokens of no kind count in ``all`` only, so data
without spans still gets the HTML page and the overall mean.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from prior.data.pipeline import SkipCounter, raw_samples
from prior.data.sidecars import SidecarError, load_sidecar, sidecar_path
from prior.data.shards import resolve_shards
from prior.data.tokenization import encode_caption
from prior.weighting import WeightInputs, Weighting

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


#: ``(tokenizer, caption, meta, n)`` -> the kinds each of the ``n`` scored tokens counts under.
TokenLabels = Callable[[PreTrainedTokenizerBase, str, dict[str, Any], int], list[tuple[str, ...]]]


def apply_weighting(
    samples: list[dict[str, Any]], weighting: Weighting, tokenizer: PreTrainedTokenizerBase, token_labels: TokenLabels
) -> list[dict[str, Any]]:
    """Replace each sample's sidecar weights by the ones ``weighting`` gives its tokens (alpha,
    floor and smoothing honoured). Only schemes that do not need the LVLM can be shown here."""
    if weighting.needs_lvlm:
        raise ValueError(
            f"loss={weighting.name} weighs tokens by the LVLM's own predictions, which the weights report "
            "does not have: it shows schemes computed from the reference LM or the json "
            "(loss=prior, prior_online, oracle, with their knobs)."
        )
    for s in samples:
        n = len(s["ids"])
        inputs = WeightInputs(loss_mask=torch.ones(1, n, dtype=torch.bool))
        inputs.ref_logprobs = torch.as_tensor(s["logprobs"], dtype=torch.float32)[None]
        if "visual" in weighting.needs:
            labels = token_labels(tokenizer, s["caption"], s["meta"], n)
            inputs.visual = torch.tensor([["visual" in kinds for kinds in labels]], dtype=torch.bool)
        s["weights"] = weighting.raw_weights(inputs)[0].numpy()
    return samples


def weights_by_kind(
    samples: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, token_labels: TokenLabels
) -> dict[str, dict[str, float]]:
    """Mean weight and token count per kind, plus ``all``."""
    sums: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        labels = token_labels(tokenizer, s["caption"], s["meta"], len(s["ids"]))
        for kinds, w in zip(labels, s["weights"].tolist(), strict=True):
            sums["all"].append(w)
            for kind in kinds:
                sums[kind].append(w)
    return {k: {"mean": float(np.mean(v)), "tokens": len(v)} for k, v in sums.items()}


def render_html(
    samples: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    stats: dict[str, dict[str, float]],
    path: str | Path,
    formula: str = "w = 1 - P_ref(token | previous tokens)",
) -> Path:
    """Write a page of captions with each token's background shaded by its weight (``formula``
    says which)."""
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
<p>{html.escape(formula)}. Darker = larger weight = the text alone does not predict it,
so the image has to. Hover a token for its weight and reference probability.</p>
<table><tr><th>token kind</th><th>mean weight</th><th>tokens</th></tr>{table}</table>
{''.join(rows)}"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
