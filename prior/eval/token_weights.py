"""What the reference LM's weights look like, on any data: per word, per position, per kind.

* ``scored_samples`` joins shard samples (img2dataset layout) with their stage-2 sidecars;
  ``apply_weighting`` turns the sidecars' reference log-probabilities into the weights a loss
  config gives.
* ``add_words`` groups each caption's scored tokens into its whitespace-delimited words (with the
  tokenizer's character offsets, or by decoding incrementally for a tokenizer without them), so
  byte-level BPE pieces (``Ġ``, ``Ċ``, words split in several pieces) are shown and counted as the
  words they spell; a word's weight is the mean of its pieces'.
* ``word_statistics``: the highest- and lowest-weight words among those seen at least
  ``min_count`` times, the mean weight by token position, and by word class: ``function`` (a
  closed list of about 150 English function words, ``FUNCTION_WORDS``: determiners, pronouns,
  prepositions, conjunctions, auxiliary and modal verbs, negation), ``number`` (has a digit),
  ``punctuation`` (no letter or digit) and ``content`` (every other word); no tagger, no download.
* ``weights_by_kind``: the mean weight per token kind of a ``TokenLabels`` function (the demo's,
  ``prior.demo.token_kinds``, reads the spans its corpus writes into each json); tokens of no
  kind count in ``all`` only (and the closing EOS in ``eos``), so other data gets those two.
* ``render_html``: a page of the samples' thumbnails beside their captions, each word shaded by
  its weight (hover: its pieces with theirs), a colour legend and the statistics.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from prior.data.pipeline import IMAGE_EXTS, SkipCounter, raw_samples, to_rgb
from prior.data.sidecars import SidecarError, load_sidecar, sidecar_path
from prior.data.shards import resolve_shards
from prior.data.tokenization import encode_caption, special_ids
from prior.weighting import WeightInputs, Weighting


def scored_samples(
    shards: Any,
    tokenizer: PreTrainedTokenizerBase,
    sidecar_dir: str | None,
    max_length: int,
    limit: int | None,
    images: int = 0,
) -> Iterator[dict[str, Any]]:
    """Samples joined with their sidecar entries, checked to have the same token ids; the first
    ``images`` samples keep their encoded image (``image``: bytes, None when the sample has none)."""
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
            sample = {"key": key, "caption": caption, "ids": ids, "weights": w, "logprobs": logp, "meta": meta}
            if seen < images:
                sample["image"] = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
            seen += 1
            yield sample


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


# --------------------------------------------------------------------------- whole words


@dataclass
class Word:
    """A whitespace-delimited word of a caption (or its closing EOS) and the scored tokens that
    spell it: ``text`` is ``caption_text[start:end]`` (the part the scored tokens cover),
    ``tokens`` their positions among the sample's scored tokens, ``pieces`` each one's own
    characters (empty for a byte-level piece that only completes a character begun before it)."""

    text: str
    start: int
    end: int
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    eos: bool = False


def token_spans(
    tokenizer: PreTrainedTokenizerBase, caption: str, ids: Iterable[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The text the caption tokens among ``ids`` (caption tokens, then EOS unless truncated)
    spell, and each caption token's character span in it.

    A fast tokenizer gives its offsets into ``caption`` itself; any other is decoded one token
    more at a time, each token spanning the characters it added (none while it ends inside a
    multi-byte character)."""
    ids = list(ids)
    caption_ids = tokenizer.encode(caption, add_special_tokens=False)
    n = min(len(ids), len(caption_ids))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(caption, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"][:n] == ids[:n]:
            return caption, [tuple(span) for span in enc["offset_mapping"][:n]]
    text, spans = "", []
    for k in range(1, n + 1):
        now = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if now.endswith("\ufffd"):  # an incomplete character: it belongs to the tokens that complete it
            spans.append((len(text), len(text)))
            continue
        common = len(text) if now.startswith(text) else len(_common_prefix(text, now))
        spans.append((common, len(now)))
        text = now
    return text, spans


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def caption_words(tokenizer: PreTrainedTokenizerBase, caption: str, ids: Iterable[int]) -> tuple[str, list[Word]]:
    """The caption's text and its scored tokens grouped into words (``token_spans``): a token
    belongs to the word of its first non-space character (a token of spaces alone to the word
    after it); the EOS that closes an untruncated caption is a word of its own (``eos``)."""
    ids = list(ids)
    text, spans = token_spans(tokenizer, caption, ids)
    bounds = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    word_of = [-1] * len(text)
    for wi, (s, e) in enumerate(bounds):
        word_of[s:e] = [wi] * (e - s)
    next_word = [max(len(bounds) - 1, 0)] * (len(text) + 1)  # the word at or after each character
    for c in range(len(text) - 1, -1, -1):
        next_word[c] = word_of[c] if word_of[c] >= 0 else next_word[c + 1]
    words: list[Word] = []
    current, done = -1, 0
    for i, (s, e) in enumerate(spans):
        wi = next_word[min(s, len(text))] if bounds else 0
        if not words or wi > current:
            start = max(bounds[wi][0] if bounds else s, done)
            words.append(Word(text="", start=start, end=start))
            current = wi
        word = words[-1]
        word.tokens.append(i)
        word.pieces.append(text[max(s, done):e])
        word.end = max(word.end, e)
        done = max(done, e)
    for word in words:
        word.text = text[word.start : word.end].strip()
    eos = special_ids(tokenizer)[1]
    if len(ids) > len(spans) and ids[len(spans)] == eos:
        name = tokenizer.convert_ids_to_tokens(eos)
        words.append(Word(text=name, start=len(text), end=len(text), tokens=[len(spans)], pieces=[name], eos=True))
    return text, words


def add_words(samples: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> None:
    """Store each sample's caption text (``text``) and whole words (``words``: ``caption_words``)."""
    for s in samples:
        s["text"], s["words"] = caption_words(tokenizer, s["caption"], s["ids"].tolist())


# --------------------------------------------------------------------------- word statistics

#: English closed-class words (determiners, pronouns, prepositions, conjunctions, auxiliary and
#: modal verbs, negation and a few adverbial particles): the ``function`` word class.
FUNCTION_WORDS = frozenset(
    """a an the this that these those each every either neither some any no all both half another such what
    which whose i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves who whom one ones about above
    across after against along amid among around as at before behind below beneath beside besides between
    beyond by despite down during except for from in inside into near of off on onto out outside over past per
    since through throughout till to toward towards under underneath until up upon via with within without and
    but or nor so yet because although though if unless whereas while whether than then when where why how
    am is are was were be been being have has had having do does did doing will would shall should can could
    may might must not n't no nor there here very too also just only it's that's there's don't doesn't isn't
    aren't wasn't weren't can't won't""".split()
)
WORD_CLASSES = ("content", "function", "number", "punctuation")


def word_key(text: str) -> str:
    """What word statistics count a word under: lower case, without surrounding punctuation
    (a word of punctuation alone stays as it is)."""
    low = text.lower()
    return re.sub(r"^[\W_]+|[\W_]+$", "", low) or low


def word_class(key: str) -> str:
    """``punctuation`` (no letter or digit), ``number`` (a digit), ``function`` (in
    ``FUNCTION_WORDS``) or ``content``."""
    if not any(ch.isalnum() for ch in key):
        return "punctuation"
    if any(ch.isdigit() for ch in key):
        return "number"
    return "function" if key in FUNCTION_WORDS else "content"


def position_bucket(position: int) -> str:
    """The 1-based label of a 0-based token position: 1..5 alone, then 6-10, 11-20, 21-40, ..."""
    q = position + 1
    if q <= 5:
        return str(q)
    hi = 10
    while q > hi:
        hi *= 2
    return f"{hi // 2 + 1}-{hi}"


def word_statistics(samples: list[dict[str, Any]], min_count: int = 5, top: int = 20) -> dict[str, Any]:
    """Statistics of the weights over whole words (``add_words`` first), for any data.

    A word occurrence weighs the mean of its pieces' weights; a word (``word_key``) the mean over
    its occurrences. Returns ``words`` (every word seen at least ``min_count`` times: word,
    count, mean, class; highest mean first), ``highest`` and ``lowest`` (the ``top`` first of
    each end), ``word_classes`` (mean and occurrences per ``word_class``), ``positions`` (mean
    and tokens per 0-based token position, EOS left out) and ``position_buckets`` (the same
    pooled by ``position_bucket``), with the counts behind them."""
    counts: dict[str, int] = defaultdict(int)
    sums: dict[str, float] = defaultdict(float)
    class_sum: dict[str, float] = defaultdict(float)
    class_n: dict[str, int] = defaultdict(int)
    pos_sum: dict[int, float] = defaultdict(float)
    pos_n: dict[int, int] = defaultdict(int)
    for s in samples:
        weights = np.asarray(s["weights"], dtype=np.float64)
        for word in s["words"]:
            if word.eos:
                continue
            mean = float(weights[word.tokens].mean())
            key = word_key(word.text)
            counts[key] += 1
            sums[key] += mean
            cls = word_class(key)
            class_sum[cls] += mean
            class_n[cls] += 1
            for t in word.tokens:
                pos_sum[t] += float(weights[t])
                pos_n[t] += 1
    frequent = [
        {"word": k, "count": c, "mean": sums[k] / c, "class": word_class(k)}
        for k, c in counts.items()
        if c >= min_count
    ]
    frequent.sort(key=lambda r: (-r["mean"], -r["count"], r["word"]))
    lowest = sorted(frequent, key=lambda r: (r["mean"], -r["count"], r["word"]))
    buckets: dict[str, list[float]] = {}
    for p in sorted(pos_n):
        acc = buckets.setdefault(position_bucket(p), [0.0, 0])
        acc[0] += pos_sum[p]
        acc[1] += pos_n[p]
    return {
        "min_count": min_count,
        "distinct_words": len(counts),
        "word_occurrences": sum(counts.values()),
        "words": frequent,
        "highest": frequent[:top],
        "lowest": lowest[:top],
        "word_classes": {
            c: {"mean": class_sum[c] / class_n[c], "words": class_n[c]} for c in WORD_CLASSES if class_n[c]
        },
        "positions": [{"position": p, "mean": pos_sum[p] / pos_n[p], "tokens": pos_n[p]} for p in sorted(pos_n)],
        "position_buckets": [{"positions": b, "mean": v[0] / v[1], "tokens": int(v[1])} for b, v in buckets.items()],
    }


# --------------------------------------------------------------------------- the page

_SHADE = "rgba(220,40,90,{:.2f})"


def _shade(w: float) -> str:
    return _SHADE.format(min(max(w, 0.0), 1.0))


def thumbnail_uri(data: bytes | None, size: int = 96) -> str | None:
    """A ``data:`` URI of the image scaled so its longer side is ``size`` pixels (small images
    scaled up with nearest neighbours, so their pixels stay visible); None without a decodable image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)
    except Exception:  # noqa: BLE001  (PIL raises many types for bad bytes: the page shows no image)
        return None
    scale = size / max(rgb.size)
    new_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    buf = io.BytesIO()
    rgb.resize(new_size, resample).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _piece_label(piece: str) -> str:
    return "‘" + (piece.replace(" ", "␣").replace("\n", "⏎") or "…") + "’"


def caption_html(sample: dict[str, Any]) -> str:
    """The caption's words (``add_words``), each shaded by its weight (the mean of its pieces');
    hovering a word shows its weight and reference probability and those of its pieces."""
    weights = np.asarray(sample["weights"], dtype=np.float64)
    logp = np.asarray(sample["logprobs"], dtype=np.float64)
    text, cells, done = sample["text"], [], 0
    for word in sample["words"]:
        cells.append(html.escape(text[done : word.start]))
        done = max(done, word.end)
        w = float(weights[word.tokens].mean())
        p = math.exp(float(logp[word.tokens].sum()))
        title = f"w={w:.2f}  p_ref={p:.2f}"
        if len(word.tokens) > 1:
            title = f"{word.text}  w={w:.2f} (mean of {len(word.tokens)} pieces)  p_ref={p:.2f}\n" + "\n".join(
                f"{_piece_label(piece)}  w={weights[t]:.2f}  p_ref={math.exp(logp[t]):.2f}"
                for t, piece in zip(word.tokens, word.pieces, strict=True)
            )
        shown = html.escape(word.text if word.eos else text[word.start : word.end])
        cls = ' class="eos"' if word.eos else ""
        cells.append(f'<span{cls} title="{html.escape(title)}" style="background: {_shade(w)}">{shown}</span>')
    return "".join(cells)


def _legend() -> str:
    swatches = "".join(f'<span style="background: {_shade(w)}">{w:.1f}</span>' for w in np.linspace(0, 1, 6))
    return f'<p class="legend">weight {swatches}</p>'


def _word_table(rows: list[dict[str, Any]], title: str) -> str:
    body = "".join(
        f'<tr><td><span style="background: {_shade(r["mean"])}">{html.escape(r["word"])}</span></td>'
        f'<td>{r["count"]}</td><td>{r["mean"]:.3f}</td><td>{r["class"]}</td></tr>'
        for r in rows
    )
    return (f"<div><h3>{title}</h3><table><tr><th>word</th><th>count</th><th>mean weight</th><th>class</th></tr>"
            f"{body}</table></div>")


def _bar_table(rows: list[tuple[str, float, int]], head: str, unit: str) -> str:
    body = "".join(
        f'<tr><td>{html.escape(label)}</td><td>{mean:.3f}</td><td>{n}</td>'
        f'<td class="bar"><div style="width: {100 * min(max(mean, 0.0), 1.0):.0f}%"></div></td></tr>'
        for label, mean, n in rows
    )
    return f"<table><tr><th>{head}</th><th>mean weight</th><th>{unit}</th><th></th></tr>{body}</table>"


def render_html(
    samples: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    stats: dict[str, dict[str, float]],
    path: str | Path,
    formula: str = "w = 1 - P_ref(token | previous tokens)",
    *,
    words: dict[str, Any] | None = None,
    thumbnail_size: int = 96,
) -> Path:
    """Write the page: a colour legend, the statistics (``words``: ``word_statistics``; the
    token-kind table of ``stats`` when it has kinds beyond ``all`` and ``eos``), then each sample's
    thumbnail (its ``image`` bytes) beside its caption shaded word by word (``formula`` says
    which weights)."""
    if any("words" not in s for s in samples):
        add_words(samples, tokenizer)
    rows = []
    for s in samples:
        uri = thumbnail_uri(s.get("image"), thumbnail_size)
        thumb = (f'<img class="thumb" alt="image {html.escape(s["key"])}" src="{uri}">' if uri
                 else f'<div class="thumb none" style="width:{thumbnail_size}px">no image</div>')
        rows.append(f'<div class="sample">{thumb}<div><code>{html.escape(s["key"])}</code>'
                    f'<p class="caption">{caption_html(s)}</p></div></div>')
    sections = []
    if "all" in stats:
        eos = f"; EOS {stats['eos']['mean']:.3f} ({stats['eos']['tokens']} tokens)" if "eos" in stats else ""
        sections.append(f"<p>Mean weight {stats['all']['mean']:.3f} over {stats['all']['tokens']} tokens{eos}.</p>")
    kinds = {k: v for k, v in stats.items() if k not in ("all", "eos")}
    if kinds:
        sections.append("<h2>By token kind</h2>" + _bar_table(
            [(k, v["mean"], v["tokens"]) for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["mean"])],
            "token kind", "tokens"))
    if words is not None:
        sections.append(
            f"<h2>By word</h2><p>{words['distinct_words']} distinct words, {words['word_occurrences']} in all; "
            f"these were seen at least {words['min_count']} times. A word's weight is the mean of its pieces'.</p>"
            f'<div class="cols">{_word_table(words["highest"], "Highest weight")}'
            f'{_word_table(words["lowest"], "Lowest weight")}</div>'
        )
        classes = [(c, v["mean"], v["words"]) for c, v in words["word_classes"].items()]
        sections.append(
            '<div class="cols"><div><h2>By word class</h2>' + _bar_table(classes, "class", "words")
            + "<p><small>function: about 150 English function words (determiners, pronouns, prepositions, "
            "conjunctions, auxiliaries); number: has a digit; punctuation: no letter or digit; content: the rest."
            "</small></p></div><div><h2>By token position</h2>"
            + _bar_table([(b["positions"], b["mean"], b["tokens"]) for b in words["position_buckets"]],
                         "position", "tokens")
            + "<p><small>1 = the first caption token; EOS left out.</small></p></div></div>"
        )
    page = f"""<!doctype html><meta charset="utf-8"><title>PRIOR token weights</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto}} td,th{{padding:2px 10px;text-align:left}}
.caption{{white-space:pre-wrap;margin:.3em 0;line-height:1.7}}
.caption span,.legend span{{padding:1px 0;border-radius:2px}}
.legend span{{display:inline-block;width:3em;text-align:center;margin-left:2px;border:1px solid #ddd}}
.sample{{display:flex;gap:1em;align-items:flex-start;margin:.8em 0}} .thumb{{flex:none;border:1px solid #ccc}}
.thumb.none{{height:3em;color:#999;font-size:small;text-align:center}} .eos{{font-size:small;color:#555}}
.cols{{display:flex;gap:3em;flex-wrap:wrap}} td.bar{{width:10em}}
td.bar div{{background:rgba(220,40,90,.8);height:.8em}}</style>
<h1>PRIOR token weights</h1>
<p>{html.escape(formula)}. Darker = larger weight = the text alone does not predict it,
so the image has to. Words are shaded by the mean weight of their tokens; hover a word for its
weight and reference probability and those of its pieces.</p>
{_legend()}
{''.join(sections)}
<h2>Samples</h2>
{''.join(rows)}"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
