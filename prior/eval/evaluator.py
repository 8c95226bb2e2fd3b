"""Running an LVLM over an evaluation benchmark: likelihood scoring, greedy generation, metrics.

``evaluate`` turns a stream of ``EvalItem``s (``prior.eval.benchmarks``) into an ``EvalResult``
whose ``metrics`` hold, where the benchmark has the data for them (a metric without data is
left out rather than reported as nan):

* ``choice_accuracy`` and ``choice_accuracy_<attribute>`` (color, shape, count, position): the
  true description against its one-attribute counterfactuals, scored by the model's mean
  log-likelihood per token (``choice_score``, so candidates of different length compete
  fairly; ``prior.eval.metrics.choice_accuracy_by_attribute``; the overall figure pools every
  (item, attribute) choice);
* ``prior_pick_rate``: how often a description from the benchmark's ``prior_alternatives``
  (for the demo: a counter-prior colour replaced by the shape's typical one) outscores the true
  one (lower is better);
* ``nll`` and ``perplexity``: token-weighted over the reference captions (``meta["caption"]``,
  else ``reference``) with their EOS; where the benchmark has ``token_labels``, ``nll_<kind>``
  per kind of token (for the demo: visual words, function words, boilerplate, noise, EOS), since
  one whole-caption perplexity penalises a re-weighting objective by construction;
* with ``generate``: greedy captions, cut by the benchmark's ``postprocess``, parsed by its
  ``parse`` into ``generation_metrics`` against ``truth_objects``, and ``bleu4`` / ``rouge_l``
  against the reference (all of ``meta["references"]`` when present).

Every text is scored on its own image, so results depend on the items only, not on
``batch_size`` (beyond float rounding in the model's kernels): per-item scores are summed in
float64 and the corpus metrics use the batch-invariant accumulators of ``prior.eval.metrics``.

``write_results`` writes ``eval.json`` and ``eval.md`` (a metric x split markdown table);
``log_results`` logs the metrics to any Lightning loggers and, to wandb, a table of the kept
samples' images, references, generations and counter-prior choices.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from prior.data.tokenization import encode_caption, special_ids
from prior.eval.benchmarks import Benchmark, EvalItem
from prior.eval.metrics import (
    METRIC_DIRECTIONS,
    GenerationCounts,
    TextMetricAccumulator,
    choice_accuracy_by_attribute,
    perplexity,
    prior_pick_rate,
)
from prior.loss import token_cross_entropy
from prior.models.lvlm import LVLM

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"


@dataclass
class EvalResult:
    """Metrics of one evaluated split, with the first items' generations for logging tables.

    Each sample holds ``key``, ``image`` ([3, H, W] tensor), ``reference``, ``generation`` (the
    decoded greedy caption, None without generation), ``prediction`` (its postprocessed text),
    ``objects`` (parsed from the prediction), ``truth`` (the item's truth objects or None) and
    ``prior_choices`` (per description of the benchmark's ``prior_alternatives``: the
    ``alternative``, whether the model ``picked_prior`` over the reference, and the ``margin``,
    the reference's ``choice_score`` minus the alternative's; empty without such a choice).
    ``skipped`` counts the benchmark's skipped samples per reason (reasons with none left out).
    """

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    num_items: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- scoring


def sequence_logprobs(
    lvlm: LVLM,
    tokenizer: PreTrainedTokenizerBase,
    images: Tensor,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    max_length: int = 80,
    with_eos: bool = False,
) -> list[float]:
    """Summed log-probability of each text's caption tokens given its image (``images[i]`` for
    ``texts[i]``), in eval mode without gradient.

    The tokens are ``encode_caption(...)[1:]`` (truncated to ``max_length`` ids in all), without
    the final EOS unless ``with_eos``; a text without tokens scores 0.
    """
    if images.dim() != 4 or images.shape[0] != len(texts):
        raise ValueError(
            f"images {tuple(images.shape)} must be [N, 3, H, W] with one image per text (N = {len(texts)})"
        )
    pairs = [(i, _caption_ids(tokenizer, t, max_length, with_eos=with_eos)) for i, t in enumerate(texts)]
    with _eval_mode(lvlm):
        return [math.fsum(lp) for lp in _score(lvlm, tokenizer, list(images), pairs, batch_size)]


def _caption_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int, *, with_eos: bool) -> list[int]:
    """``[BOS] ids [EOS]`` of ``text``, without the EOS unless ``with_eos``."""
    ids = encode_caption(tokenizer, text, max_length)
    if not with_eos and len(ids) > 1 and ids[-1] == special_ids(tokenizer)[1]:
        ids = ids[:-1]
    return ids


def _score(
    lvlm: LVLM,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Tensor],
    pairs: Sequence[tuple[int, list[int]]],
    batch_size: int,
) -> list[list[float]]:
    """Per-token log-probabilities (float64) of each (image index, caption ids) pair's ids[1:]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = special_ids(tokenizer)[2]
    device, dtype = _device_dtype(lvlm)
    logprobs: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            length = max(2, *(len(ids) for _, ids in chunk))
            input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            attention = torch.zeros(input_ids.shape, dtype=torch.bool)
            for row, (_, ids) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.as_tensor(ids)
                attention[row, : len(ids)] = True
            batch, image_mask = _batch_images([images[i] for i, _ in chunk], device, dtype)
            out = lvlm(batch, input_ids.to(device), attention.to(device), image_mask)
            lp = -token_cross_entropy(out.logits, out.targets, out.loss_mask).double().cpu()
            logprobs += [lp[row, : len(ids) - 1].tolist() for row, (_, ids) in enumerate(chunk)]
    return logprobs


def choice_score(token_logprobs: Sequence[float]) -> float:
    """What a forced choice compares: the mean log-probability per token, so candidates of
    different length (a count counterfactual adds or drops a whole object phrase) compete on
    equal terms; a summed log-probability would favour the shortest candidate. -inf when empty."""
    return math.fsum(token_logprobs) / len(token_logprobs) if token_logprobs else -math.inf


def _generate(
    lvlm: LVLM,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Tensor],
    max_new_tokens: int,
) -> list[str]:
    """Greedy captions of ``images``, decoded without special tokens."""
    device, dtype = _device_dtype(lvlm)
    batch, image_mask = _batch_images(images, device, dtype)
    ids = lvlm.generate(batch, max_new_tokens=max_new_tokens, image_mask=image_mask)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _device_dtype(lvlm: LVLM) -> tuple[torch.device, torch.dtype]:
    """The model's device and the dtype images are fed in (its backbone's parameters')."""
    param = next(lvlm.backbone.parameters(), None)
    if param is None:
        param = next(lvlm.parameters())
    return param.device, param.dtype


def _batch_images(
    images: Sequence[Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Images as one batch, zero-padded top-left with an ``image_mask`` when their sizes differ."""
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(list(images)).to(device, dtype), None
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = torch.zeros(len(images), 3, h, w)
    mask = torch.zeros(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = True
    return batch.to(device, dtype), mask.to(device)


@contextlib.contextmanager
def _eval_mode(lvlm: LVLM) -> Iterator[None]:
    """Eval mode inside the block; the previous mode is restored afterwards."""
    was_training = lvlm.training
    lvlm.eval()
    try:
        yield
    finally:
        lvlm.train(was_training)


# --------------------------------------------------------------------------- evaluation


class _NoHooks(Benchmark):
    """The hooks of a benchmark that has none (``evaluate`` without ``benchmark``)."""

    def items(self, split: str, limit: int | None = None):  # noqa: ANN201
        raise NotImplementedError


_NO_HOOKS = _NoHooks()


@dataclass
class _Tally:
    """Everything ``evaluate`` accumulates over the items."""

    true_scores: list[float] = field(default_factory=list)
    counterfactual_scores: list[dict[str, list[float]]] = field(default_factory=list)
    prior_true: list[float] = field(default_factory=list)
    prior_typical: list[float | None] = field(default_factory=list)
    nll_sum: float = 0.0
    tokens: int = 0
    kind_nll: Counter[str] = field(default_factory=Counter)
    kind_tokens: Counter[str] = field(default_factory=Counter)
    generation: GenerationCounts = field(default_factory=GenerationCounts)
    truth_captions: int = 0
    text: TextMetricAccumulator = field(default_factory=TextMetricAccumulator)
    samples: list[dict[str, Any]] = field(default_factory=list)
    items: int = 0

    def metrics(self) -> dict[str, float]:
        """The metrics the tallied data supports."""
        out: dict[str, float] = {}
        if self.true_scores:
            choices = choice_accuracy_by_attribute(self.true_scores, self.counterfactual_scores)
            if choices["all"].scored:
                out["choice_accuracy"] = choices["all"].accuracy
            for attr, result in choices.items():
                if attr != "all" and result.scored:
                    out[f"choice_accuracy_{attr}"] = result.accuracy
        if self.prior_typical:
            out["prior_pick_rate"] = prior_pick_rate(self.prior_true, self.prior_typical)
        if self.tokens:
            out["nll"] = self.nll_sum / self.tokens
            out["perplexity"] = perplexity(self.nll_sum, self.tokens)
        for kind, n in self.kind_tokens.items():
            out[f"nll_{kind}"] = self.kind_nll[kind] / n
        if self.truth_captions:
            out.update(self.generation.compute())
        if self.text.count:
            out.update(self.text.compute())
        return out


def evaluate(
    lvlm: LVLM,
    tokenizer: PreTrainedTokenizerBase,
    items: Iterable[EvalItem],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 48,
    max_length: int = 80,
    generate: bool = True,
    benchmark: Benchmark | None = None,
    num_samples: int = 16,
    progress: str | None = None,
) -> EvalResult:
    """Score, and with ``generate`` caption, every item; the metrics are described in the module
    docstring.

    ``batch_size`` is both the number of (image, text) pairs per scoring forward and the number
    of images per generation batch; ``max_length`` caps the ids of every scored text (as in
    training); ``benchmark`` (the one the items come from) says how to read the model's output
    through its ``postprocess``, ``parse``, ``prior_alternatives`` and ``token_labels`` hooks
    (without one, generations are only stripped and the metrics that need a hook are left
    out); the first ``num_samples`` items are kept in ``EvalResult.samples``. The model is
    evaluated in eval mode without gradient and left in the mode it was in. ``progress`` names
    a progress bar over the items (shown on a terminal; None, inside a training loop that has
    its own, shows none).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tally = _Tally()
    total = getattr(items, "total", None) or (len(items) if isinstance(items, Sequence) else None)
    bar = tqdm(total=total, desc=progress, unit="item", disable=None if progress else True)
    iterator = iter(items)
    with _eval_mode(lvlm), bar:
        while chunk := list(itertools.islice(iterator, batch_size)):
            _evaluate_chunk(
                lvlm, tokenizer, chunk, tally,
                batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
                generate=generate, benchmark=benchmark or _NO_HOOKS, num_samples=num_samples,
            )  # fmt: skip
            bar.update(len(chunk))
    skipped = {reason: n for reason, n in getattr(items, "skipped", {}).items() if n}
    if tally.items == 0:
        raise ValueError(
            f"No items to evaluate (skipped samples: {skipped or 'none'}): check the benchmark's paths."
        )
    return EvalResult(metrics=tally.metrics(), samples=tally.samples, num_items=tally.items, skipped=skipped)


def _evaluate_chunk(
    lvlm: LVLM,
    tokenizer: PreTrainedTokenizerBase,
    chunk: list[EvalItem],
    tally: _Tally,
    *,
    batch_size: int,
    max_new_tokens: int,
    max_length: int,
    generate: bool,
    benchmark: Benchmark,
    num_samples: int,
) -> None:
    """Add a chunk of items to ``tally``."""
    # Every distinct description of an item is scored once on its image; then its caption.
    choice_texts: list[list[str]] = []
    alternatives = [benchmark.prior_alternatives(item) for item in chunk]
    for item, prior_texts in zip(chunk, alternatives, strict=True):
        texts = [item.reference, *(t for ts in item.candidates.values() for t in ts), *prior_texts]
        choice_texts.append(list(dict.fromkeys(texts)))
    pairs = [
        (i, _caption_ids(tokenizer, text, max_length, with_eos=False))
        for i, texts in enumerate(choice_texts)
        for text in texts
    ]
    captions = [item.meta.get("caption", item.reference) for item in chunk]
    pairs += [(i, _caption_ids(tokenizer, c, max_length, with_eos=True)) for i, c in enumerate(captions)]
    images = [item.image for item in chunk]
    logprobs = _score(lvlm, tokenizer, images, pairs, batch_size)

    offset = 0
    prior_choices: list[list[dict[str, Any]]] = []
    for item, texts, prior_texts in zip(chunk, choice_texts, alternatives, strict=True):
        score = {t: choice_score(lp) for t, lp in zip(texts, logprobs[offset : offset + len(texts)], strict=True)}
        offset += len(texts)
        if any(item.candidates.values()):
            tally.true_scores.append(score[item.reference])
            tally.counterfactual_scores.append({a: [score[t] for t in ts] for a, ts in item.candidates.items()})
        for typical in prior_texts:
            tally.prior_true.append(score[item.reference])
            tally.prior_typical.append(score[typical])
        prior_choices.append([  # a tie counts as a pick, as in prior_pick_rate
            {"alternative": t, "picked_prior": not score[item.reference] > score[t],
             "margin": score[item.reference] - score[t]}
            for t in prior_texts
        ])
    for item, caption, lp in zip(chunk, captions, logprobs[offset:], strict=True):
        tally.nll_sum -= math.fsum(lp)
        tally.tokens += len(lp)
        labels = benchmark.token_labels(tokenizer, caption, item.meta, len(lp))
        if labels is not None:
            for kinds, value in zip(labels, lp, strict=True):
                for label in kinds:
                    tally.kind_nll[label] -= value
                    tally.kind_tokens[label] += 1

    generations: list[str | None] = [None] * len(chunk)
    predictions: list[str | None] = [None] * len(chunk)
    parsed: list[list[dict] | None] = [None] * len(chunk)
    if generate:
        generations = list(_generate(lvlm, tokenizer, images, max_new_tokens))
        predictions = [benchmark.postprocess(g) for g in generations]
        parsed = [benchmark.parse(p) for p in predictions]
        with_truth = [i for i, item in enumerate(chunk) if item.truth_objects is not None and parsed[i] is not None]
        tally.generation.update([parsed[i] for i in with_truth], [chunk[i].truth_objects for i in with_truth])
        tally.truth_captions += len(with_truth)
        tally.text.update(predictions, [item.meta.get("references") or item.reference for item in chunk])

    for i, item in enumerate(chunk):
        if len(tally.samples) < num_samples:
            tally.samples.append(
                {
                    "key": item.key,
                    "image": item.image,
                    "reference": item.reference,
                    "generation": generations[i],
                    "prediction": predictions[i],
                    "objects": parsed[i],
                    "truth": item.truth_objects,
                    "prior_choices": prior_choices[i],
                }
            )
    tally.items += len(chunk)


# --------------------------------------------------------------------------- results


def markdown_table(result_by_split: dict[str, EvalResult]) -> str:
    """A markdown table: one row per metric (known ones in ``METRIC_DIRECTIONS`` order, then the
    others as first seen) plus the item count, one column per split; "-" where a split has no value."""
    splits = list(result_by_split)
    seen = dict.fromkeys(name for r in result_by_split.values() for name in r.metrics)
    names = [n for n in METRIC_DIRECTIONS if n in seen] + [n for n in seen if n not in METRIC_DIRECTIONS]
    lines = [
        "| metric | " + " | ".join(splits) + " |",
        "|---|" + "---:|" * len(splits),
    ]
    for name in names:
        cells = [
            f"{result_by_split[s].metrics[name]:.4f}" if name in result_by_split[s].metrics else "-" for s in splits
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| items | " + " | ".join(str(result_by_split[s].num_items) for s in splits) + " |")
    return "\n".join(lines) + "\n"


def write_results(result_by_split: dict[str, EvalResult], folder: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` (per split: ``metrics``, ``num_items``, ``skipped``) and ``eval.md``
    (``markdown_table``) into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        split: {"metrics": r.metrics, "num_items": r.num_items, "skipped": r.skipped}
        for split, r in result_by_split.items()
    }
    json_path = folder / JSON_FILE
    md_path = folder / MARKDOWN_FILE
    json_path.write_text(json.dumps(data, indent=2))
    md_path.write_text(markdown_table(result_by_split))
    return json_path, md_path


def log_results(loggers: Iterable[Any], result_by_split: dict[str, EvalResult], step: int | None = None) -> None:
    """Log ``eval/<split>/<metric>`` to every logger (at ``step``, when given) and, to a wandb
    logger, ``eval/<split>/samples``: a table of each split's kept samples (``samples_table``)."""
    from lightning.pytorch.loggers import WandbLogger

    flat = {f"eval/{s}/{name}": v for s, r in result_by_split.items() for name, v in r.metrics.items()}
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        if isinstance(logger, WandbLogger):
            tables: dict[str, Any] = {
                f"eval/{s}/samples": samples_table(r.samples) for s, r in result_by_split.items() if r.samples
            }
            if tables:
                logger.experiment.log(tables if step is None else {**tables, "trainer/global_step": step})


def samples_table(samples: Sequence[dict[str, Any]]) -> Any:
    """A ``wandb.Table`` of evaluated samples (``EvalResult.samples``): key, image, reference,
    the greedy caption (when generated) and the counter-prior choices (when the benchmark has any)."""
    import wandb

    from prior.callbacks import wandb_image

    generated = any(s["generation"] is not None for s in samples)
    choices = any(s.get("prior_choices") for s in samples)
    columns = ["key", "image", "reference"] + ["generated"] * generated + ["counter-prior choices"] * choices
    table = wandb.Table(columns=columns)
    for s in samples:
        row = [s["key"], wandb_image(s["image"]), s["reference"]]
        if generated:
            row.append(s["generation"])
        if choices:
            row.append("; ".join(
                f"{'picked' if c['picked_prior'] else 'rejected'} prior {c['alternative']!r} "
                f"(true - prior {c['margin']:+.3f})"
                for c in s.get("prior_choices", [])
            ))
        table.add_data(*row)
    return table
