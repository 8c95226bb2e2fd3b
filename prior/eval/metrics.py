"""Model-agnostic evaluation metrics: choices, generations, text, perplexity and comparisons.

Nothing here runs a model. Scores are log-likelihoods (higher = the model prefers the text),
generations and ground truth are lists of objects (dicts with ``shape`` and optionally ``color``,
``size``, ``position``; ``prior.demo.corpus.parse_description`` makes them from text), and
learning curves are (step, value) sequences.

Corpus-level metrics come with accumulators (``GenerationCounts``, ``TextMetricAccumulator``)
so an evaluator can stream batches: the result depends only on the items seen, never on how
they were batched.

Metric names and directions
    ``METRIC_DIRECTIONS`` says, per metric name used here, whether higher is better.
    ``higher_is_better`` looks a name up, ignoring a prefix up to the last "/" (such as a split,
    "test_counter/choice_accuracy_color").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from torchmetrics.text import BLEUScore
from torchmetrics.text.rouge import ROUGEScore

CHOICE_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "position")
#: Object attributes whose mentions ``generation_metrics`` checks beside the shape.
GENERATION_ATTRIBUTES: tuple[str, ...] = ("color", "size", "position")

#: Higher-is-better per metric name produced by this module (and the evaluator's losses).
METRIC_DIRECTIONS: dict[str, bool] = {
    "choice_accuracy": True,
    **{f"choice_accuracy_{a}": True for a in CHOICE_ATTRIBUTES},
    "prior_pick_rate": False,
    "object_precision": True,
    "object_recall": True,
    **{f"{a}_{m}": True for a in GENERATION_ATTRIBUTES for m in ("precision", "recall")},
    "chair_i": False,
    "chair_s": False,
    "color_hallucination": False,
    "missing_object_rate": False,
    "bleu4": True,
    "rouge_l": True,
    "perplexity": False,
    "nll": False,
    # per kind of token (``nll_<kind>``, the kinds a benchmark's ``token_labels`` name; the demo's)
    **{f"nll_{k}": False for k in ("visual", "shape", "color_typical", "color_counter", "function", "boilerplate",
                                    "noise", "scene", "eos")},
}


def higher_is_better(name: str) -> bool:
    """Whether higher is better for metric ``name`` (a prefix up to the last "/" is ignored)."""
    base = name.rsplit("/", 1)[-1]
    if base not in METRIC_DIRECTIONS:
        raise KeyError(
            f"No direction known for metric {name!r}; known metrics: {sorted(METRIC_DIRECTIONS)}. "
            "Pass `directions` explicitly for other metrics."
        )
    return METRIC_DIRECTIONS[base]


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0."""
    return numerator / denominator if denominator else 0.0


# --------------------------------------------------------------------------- choices


@dataclass(frozen=True)
class ChoiceResult:
    """Outcome of a set of forced choices between a true description and its counterfactuals.

    ``accuracy`` is ``correct / scored`` (nan when nothing was scored); ``excluded`` counts items
    that had no counterfactual and so posed no choice.
    """

    accuracy: float
    correct: int
    scored: int
    excluded: int


def choice_result(
    true_scores: Sequence[float], counterfactual_scores: Sequence[Sequence[float]]
) -> ChoiceResult:
    """Per item, whether the true description's score beats every counterfactual's strictly.

    A tie or a nan score counts as wrong; an item with no counterfactual is excluded and counted.
    """
    if len(true_scores) != len(counterfactual_scores):
        raise ValueError(
            f"{len(true_scores)} true scores but {len(counterfactual_scores)} counterfactual lists"
        )
    correct = scored = excluded = 0
    for true, others in zip(true_scores, counterfactual_scores, strict=True):
        if len(others) == 0:
            excluded += 1
            continue
        scored += 1
        correct += all(true > other for other in others)
    return ChoiceResult(correct / scored if scored else math.nan, correct, scored, excluded)


def choice_accuracy(
    true_scores: Sequence[float], counterfactual_scores: Sequence[Sequence[float]]
) -> float:
    """Fraction of items whose true description strictly outscores all its counterfactuals.

    Items without counterfactuals are left out (``choice_result`` counts them); nan when no item
    has any.
    """
    return choice_result(true_scores, counterfactual_scores).accuracy


def choice_accuracy_by_attribute(
    true_scores: Sequence[float],
    counterfactual_scores: Sequence[Mapping[str, Sequence[float]]],
) -> dict[str, ChoiceResult]:
    """``choice_result`` per attribute, plus ``"all"`` pooled over every (item, attribute) choice.

    ``counterfactual_scores[i]`` maps an attribute (e.g. "color") to the scores of item ``i``'s
    counterfactuals that change it; an attribute missing from an item counts as excluded there.
    """
    if len(true_scores) != len(counterfactual_scores):
        raise ValueError(
            f"{len(true_scores)} true scores but {len(counterfactual_scores)} counterfactual maps"
        )
    attributes = sorted({a for scores in counterfactual_scores for a in scores})
    results = {
        a: choice_result(true_scores, [scores.get(a, ()) for scores in counterfactual_scores])
        for a in attributes
    }
    correct = sum(r.correct for r in results.values())
    scored = sum(r.scored for r in results.values())
    excluded = sum(r.excluded for r in results.values())
    results["all"] = ChoiceResult(
        correct / scored if scored else math.nan, correct, scored, excluded
    )
    return results


def prior_pick_rate(true_scores: Sequence[float], typical_scores: Sequence[float | None]) -> float:
    """Fraction of counter-prior colour choices where the model prefers the prior.

    Entry ``i`` is one choice: the true description's score and the score of the description
    with the counter-prior object's colour replaced by its shape's typical colour, or None where
    there is no such choice (the entry is skipped). A tie counts as a pick, as a tie counts wrong
    in ``choice_accuracy``. nan when no entry has a typical-colour score. Lower is better.
    """
    if len(true_scores) != len(typical_scores):
        raise ValueError(f"{len(true_scores)} true scores but {len(typical_scores)} typical scores")
    picks = [
        not true > typical
        for true, typical in zip(true_scores, typical_scores, strict=True)
        if typical is not None
    ]
    return sum(picks) / len(picks) if picks else math.nan


# --------------------------------------------------------------------------- generations


@dataclass
class GenerationCounts:
    """Running counts behind ``generation_metrics``; ``update`` with batches, then ``compute``.

    Matching rules, per caption (all counts are pooled over captions):

    * a *mention* is a generated object; it is correct at the object (shape) level when the image
      has an object of that shape, otherwise it is hallucinated;
    * an attribute mention (colour, size, position; None = not mentioned) is correct when the
      image has an object of that shape with that attribute value;
    * recall matches one to one: a ground-truth object counts as found when some mention of its
      shape (and attribute value, for attribute recall) is left for it, so naming one circle
      finds one of two circles.
    """

    captions: int = 0
    captions_hallucinating: int = 0
    truth_objects: int = 0
    mentions: int = 0
    hallucinated: int = 0
    objects_found: int = 0
    color_on_present_shape: int = 0
    wrong_color_on_present_shape: int = 0
    #: Per attribute of ``GENERATION_ATTRIBUTES``: mentions, correct mentions, objects found.
    attribute_mentions: Counter[str] = field(default_factory=Counter)
    attribute_correct: Counter[str] = field(default_factory=Counter)
    attribute_found: Counter[str] = field(default_factory=Counter)

    def update(self, generated: Sequence[Sequence[dict]], truth: Sequence[Sequence[dict]]) -> None:
        """Count a batch: the objects each caption mentions against its image's objects."""
        if len(generated) != len(truth):
            raise ValueError(f"{len(generated)} generations but {len(truth)} ground truths")
        for mentioned, actual in zip(generated, truth, strict=True):
            self._add_caption(mentioned, actual)

    def _add_caption(self, mentioned: Sequence[dict], actual: Sequence[dict]) -> None:
        shapes = Counter(o["shape"] for o in actual)
        said = Counter(o["shape"] for o in mentioned)
        hallucinated = sum(n for shape, n in said.items() if shape not in shapes)
        self.captions += 1
        self.captions_hallucinating += hallucinated > 0
        self.truth_objects += len(actual)
        self.mentions += len(mentioned)
        self.hallucinated += hallucinated
        self.objects_found += sum(min(n, shapes[shape]) for shape, n in said.items())
        for attr in GENERATION_ATTRIBUTES:
            pairs = Counter((o["shape"], o[attr]) for o in actual)
            said_pairs = Counter(
                (o["shape"], o[attr]) for o in mentioned if o.get(attr) is not None
            )
            self.attribute_mentions[attr] += said_pairs.total()
            self.attribute_correct[attr] += sum(n for p, n in said_pairs.items() if p in pairs)
            self.attribute_found[attr] += sum(min(n, pairs[p]) for p, n in said_pairs.items())
            if attr == "color":
                on_present = {p: n for p, n in said_pairs.items() if p[0] in shapes}
                self.color_on_present_shape += sum(on_present.values())
                self.wrong_color_on_present_shape += sum(
                    n for p, n in on_present.items() if p not in pairs
                )

    def merge(self, other: GenerationCounts) -> None:
        """Add another accumulator's counts (e.g. from another process) to this one."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, Counter):
                mine.update(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))

    def compute(self) -> dict[str, float]:
        """The rates of ``generation_metrics`` from the counts so far."""
        out = {
            "object_precision": _ratio(self.mentions - self.hallucinated, self.mentions),
            "object_recall": _ratio(self.objects_found, self.truth_objects),
        }
        for attr in GENERATION_ATTRIBUTES:
            out[f"{attr}_precision"] = _ratio(
                self.attribute_correct[attr], self.attribute_mentions[attr]
            )
            out[f"{attr}_recall"] = _ratio(self.attribute_found[attr], self.truth_objects)
        out["chair_i"] = _ratio(self.hallucinated, self.mentions)
        out["chair_s"] = _ratio(self.captions_hallucinating, self.captions)
        out["color_hallucination"] = _ratio(
            self.wrong_color_on_present_shape, self.color_on_present_shape
        )
        out["missing_object_rate"] = _ratio(
            self.truth_objects - self.objects_found, self.truth_objects
        )
        return out


def generation_metrics(
    generated: Sequence[Sequence[dict]], truth: Sequence[Sequence[dict]]
) -> dict[str, float]:
    """Generated captions' objects scored against the images' ground-truth objects.

    ``generated[i]`` are the objects caption ``i`` mentions (``shape`` required; ``color``,
    ``size``, ``position`` may be None), ``truth[i]`` the objects in image ``i``. Returns, pooled
    over all captions (matching rules in ``GenerationCounts``):

    * ``object_precision`` / ``object_recall``: at the shape level (the shape attribute);
    * ``{color,size,position}_precision`` / ``_recall``: per attribute, tied to the shape;
    * ``chair_i``: mentions whose shape is not in the image / all mentions;
    * ``chair_s``: captions with at least one such mention / all captions;
    * ``color_hallucination``: colour mentions on a shape that is in the image where no object
      of that shape has that colour / colour mentions on shapes in the image;
    * ``missing_object_rate``: ground-truth objects no mention accounts for / all of them.

    A rate whose denominator is empty is 0.0: an empty caption hallucinates nothing and earns no
    precision, and still counts as a caption (chair_s) and towards recall and missing objects.
    """
    counts = GenerationCounts()
    counts.update(generated, truth)
    return counts.compute()


# --------------------------------------------------------------------------- text


def _normalize(text: str) -> str:
    """Lowercase runs of letters and digits, joined by single spaces."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class TextMetricAccumulator:
    """Corpus-level BLEU-4 and ROUGE-L (F) from torchmetrics, fed batch by batch.

    Both metrics see the same tokens, lowercase runs of letters and digits, so punctuation and
    the detokenizer's spacing cannot move them. BLEU-4 (no smoothing) pools n-gram counts and
    lengths over the corpus; ROUGE-L is the mean over predictions of the F-measure, against the
    best-matching reference when there are several. Both depend only on the (prediction,
    references) pairs seen, not on batching; reordering changes ROUGE-L only by float rounding.
    """

    def __init__(self) -> None:
        self._bleu = BLEUScore(n_gram=4)
        self._rouge = ROUGEScore(rouge_keys="rougeL", accumulate="best")
        self.count = 0

    def update(self, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add predictions, each with one reference or a sequence of references."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return
        preds = [_normalize(p) for p in predictions]
        refs: list[list[str]] = []
        for i, ref in enumerate(references):
            group = [ref] if isinstance(ref, str) else list(ref)
            if not group:
                raise ValueError(f"prediction {i} has no reference")
            refs.append([_normalize(r) for r in group])
        self._bleu.update(preds, refs)
        self._rouge.update(preds, refs)
        self.count += len(preds)

    def compute(self) -> dict[str, float]:
        """``{"bleu4", "rouge_l"}`` over everything added so far; nan for both when empty."""
        if self.count == 0:
            return {"bleu4": math.nan, "rouge_l": math.nan}
        return {
            "bleu4": float(self._bleu.compute()),
            "rouge_l": float(self._rouge.compute()["rougeL_fmeasure"]),
        }


def text_metrics(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Corpus-level BLEU-4 and ROUGE-L F of ``predictions`` (see ``TextMetricAccumulator``)."""
    acc = TextMetricAccumulator()
    acc.update(predictions, references)
    return acc.compute()


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(nll_sum / tokens), with ``nll_sum`` the summed natural-log NLL of ``tokens`` tokens."""
    if tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got {tokens}")
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------- comparisons


def relative_improvement(ntp: float, prior: float, higher_is_better: bool = True) -> float:
    """Relative gain of PRIOR over NTP: (prior - ntp) / |ntp|, negated for lower-is-better metrics.

    Positive always means PRIOR is better. nan when either value is nan, or when ntp == 0 and
    the values differ (0.0 when both are 0).
    """
    if math.isnan(ntp) or math.isnan(prior):
        return math.nan
    if ntp == 0:
        return 0.0 if prior == 0 else math.nan
    gain = (prior - ntp) / abs(ntp)
    return gain if higher_is_better else -gain


def average_relative_improvement(
    ntp: Mapping[str, float],
    prior: Mapping[str, float],
    directions: Mapping[str, bool] | None = None,
    metrics: Iterable[str] | None = None,
) -> float:
    """Mean of ``relative_improvement`` over ``metrics`` (default: all of ``ntp``'s).

    ``directions`` maps metric name -> higher-is-better (default: ``higher_is_better``).
    Metrics whose improvement is nan are left out of the mean; nan when none is left.
    """
    names = list(ntp if metrics is None else metrics)
    missing = [n for n in names if n not in ntp or n not in prior]
    if missing:
        raise KeyError(f"metrics {missing} are missing from the NTP or the PRIOR results")
    gains = []
    for name in names:
        if directions is None:
            up = higher_is_better(name)
        elif name in directions:
            up = directions[name]
        else:
            raise KeyError(f"no direction given for metric {name!r}")
        gain = relative_improvement(ntp[name], prior[name], up)
        if not math.isnan(gain):
            gains.append(gain)
    return sum(gains) / len(gains) if gains else math.nan


# --------------------------------------------------------------------------- learning curves


def _curve(steps: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"need equally long, non-empty steps and values; got {x.shape}, {y.shape}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"steps must be strictly increasing, got {list(steps)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"steps and values must be finite; got {list(steps)}, {list(values)}")
    return x, y


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under the curve divided by its step range: the metric's mean level.

    A single checkpoint gives its own value.
    """
    x, y = _curve(steps, values)
    if x.size == 1:
        return float(y[0])
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def steps_to_threshold(
    steps: Sequence[float],
    values: Sequence[float],
    threshold: float,
    higher_is_better: bool = True,
) -> float | None:
    """First step at which the metric reaches ``threshold`` (>= it, or <= it when lower is
    better), interpolating linearly between checkpoints; None if it never does."""
    x, y = _curve(steps, values)
    if not higher_is_better:
        y, threshold = -y, -threshold
    reached = np.flatnonzero(y >= threshold)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(x[0])
    fraction = (threshold - y[i - 1]) / (y[i] - y[i - 1])
    return float(x[i - 1] + fraction * (x[i] - x[i - 1]))


def power_law_fit(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit of value = a * step^b in log-log space: (a, b, r2 in log space).

    Points with a non-positive or non-finite step or value are left out; at least two points with
    distinct steps must remain. ``b`` is the scaling coefficient.
    """
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need equally long steps and values; got {x.shape}, {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if np.unique(x).size < 2:
        raise ValueError(
            f"a power-law fit needs at least 2 points with distinct positive steps and positive "
            f"values; {x.size} usable point(s) of {keep.size}"
        )
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = float(np.sum((ly - (slope * lx + intercept)) ** 2))
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return float(math.exp(intercept)), float(slope), r2
