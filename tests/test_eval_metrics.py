"""Evaluation metrics and benchmark readers on hand-made cases with known answers."""

from __future__ import annotations

import json
import math
import random

import pytest

from prior.demo.corpus import (
    TYPICAL_COLOR,
    CorpusConfig,
    SplitSpec,
    generate_corpus,
    parse_description,
)
from prior.demo.benchmark import DemoBenchmark, typical_color_counterfactuals
from prior.eval.benchmarks import CocoCaptions, EvalItem, coco_caption_items
from prior.eval.metrics import (
    METRIC_DIRECTIONS,
    GenerationCounts,
    TextMetricAccumulator,
    area_under_curve,
    average_relative_improvement,
    choice_accuracy,
    choice_accuracy_by_attribute,
    choice_result,
    generation_metrics,
    higher_is_better,
    perplexity,
    power_law_fit,
    prior_pick_rate,
    relative_improvement,
    steps_to_threshold,
    text_metrics,
)
from tests.helpers import png_bytes, write_img2dataset_shards


def obj(
    shape: str, color: str | None = None, size: str | None = None, pos: str | None = None
) -> dict:
    """An object as parse_description returns it (None = attribute not mentioned)."""
    return {"shape": shape, "color": color, "size": size, "position": pos}


# ----------------------------------------------------------------------------- choices


def test_choice_accuracy_perfect_wrong_and_ties():
    assert choice_accuracy([0.0, -1.0], [[-2.0, -3.0], [-5.0]]) == 1.0
    assert choice_accuracy([-4.0, -1.0], [[-2.0, -3.0], [-5.0]]) == 0.5
    assert choice_accuracy([-2.0], [[-2.0, -9.0]]) == 0.0  # a tie is wrong
    assert choice_accuracy([math.nan], [[-2.0]]) == 0.0


def test_choice_result_excludes_and_counts_items_without_counterfactuals():
    result = choice_result([1.0, 1.0, 1.0], [[0.0], [], [2.0]])
    assert (result.accuracy, result.correct, result.scored, result.excluded) == (0.5, 1, 2, 1)
    assert math.isnan(choice_accuracy([1.0], [[]]))
    with pytest.raises(ValueError, match="2 true scores"):
        choice_accuracy([1.0, 2.0], [[0.0]])


def test_choice_accuracy_by_attribute_and_pooled():
    results = choice_accuracy_by_attribute(
        [0.0, 0.0],
        [{"color": [-1.0], "shape": [1.0]}, {"color": [-1.0], "shape": []}],
    )
    assert results["color"].accuracy == 1.0
    assert (results["shape"].accuracy, results["shape"].excluded) == (0.0, 1)
    assert (results["all"].correct, results["all"].scored, results["all"].excluded) == (2, 3, 1)


def test_prior_pick_rate():
    assert prior_pick_rate([-1.0, -1.0, -1.0], [-0.5, -2.0, None]) == 0.5
    assert prior_pick_rate([-1.0], [-1.0]) == 1.0  # a tie is a pick
    assert math.isnan(prior_pick_rate([-1.0], [None]))


# ----------------------------------------------------------------------------- generation


TRUTH = [obj("circle", "red", "small", "left"), obj("square", "blue", "large", "right")]


def test_generation_perfect_caption():
    m = generation_metrics([[dict(o) for o in TRUTH]], [TRUTH])
    for name in ("object", "color", "size", "position"):
        assert m[f"{name}_precision"] == 1.0 and m[f"{name}_recall"] == 1.0
    for name in ("chair_i", "chair_s", "color_hallucination", "missing_object_rate"):
        assert m[name] == 0.0


def test_generation_hallucinated_shape():
    m = generation_metrics([[*TRUTH, obj("star", "yellow")]], [TRUTH])
    assert m["object_precision"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(1 / 3)
    assert m["chair_s"] == 1.0
    assert m["object_recall"] == 1.0
    assert m["color_precision"] == pytest.approx(2 / 3)
    assert m["color_hallucination"] == 0.0  # the star is not in the image: an object error


def test_generation_wrong_colour_and_missing_object():
    m = generation_metrics([[obj("circle", "green")]], [TRUTH])
    assert m["object_precision"] == 1.0 and m["chair_i"] == 0.0 and m["chair_s"] == 0.0
    assert m["color_hallucination"] == 1.0
    assert m["color_precision"] == 0.0 and m["color_recall"] == 0.0
    assert m["object_recall"] == 0.5 and m["missing_object_rate"] == 0.5
    assert m["size_precision"] == 0.0  # no size named: nothing to check


def test_generation_counts_duplicates_one_to_one():
    truth = [[obj("circle", "red"), obj("circle", "red")]]
    m = generation_metrics([[obj("circle", "red")]], truth)
    assert m["object_recall"] == 0.5 and m["missing_object_rate"] == 0.5
    assert m["object_precision"] == 1.0


def test_generation_empty_captions():
    m = generation_metrics([[], [dict(o) for o in TRUTH]], [TRUTH, TRUTH])
    assert m["object_precision"] == 1.0 and m["chair_s"] == 0.0
    assert m["object_recall"] == 0.5 and m["missing_object_rate"] == 0.5
    m = generation_metrics([[]], [TRUTH])
    assert m["object_precision"] == 0.0 and m["chair_i"] == 0.0 and m["missing_object_rate"] == 1.0
    assert all(v == 0.0 for v in generation_metrics([], []).values())
    with pytest.raises(ValueError, match="generations"):
        generation_metrics([[]], [])


def test_generation_counts_stream_and_merge():
    generated = [[obj("circle", "green")], [*TRUTH, obj("star")], [], [dict(o) for o in TRUTH]]
    truth = [TRUTH] * 4
    whole = generation_metrics(generated, truth)
    a, b = GenerationCounts(), GenerationCounts()
    a.update(generated[:1], truth[:1])
    b.update(generated[1:3], truth[1:3])
    b.update(generated[3:], truth[3:])
    a.merge(b)
    assert a.compute() == whole


# ----------------------------------------------------------------------------- text


SENTENCES = [
    "two shapes: a large circle in red on the left and a small square in blue on the right",
    "one shape: a small star in yellow in the middle",
    "three shapes: a small heart in pink on the left, a large diamond in purple in the middle "
    "and a small star in yellow on the right",
    "one shape: a large triangle in green on the right",
    "two shapes: a small square in blue in the middle and a large triangle in green on the right",
]


def test_text_metrics_identical_and_disjoint():
    same = text_metrics(SENTENCES, SENTENCES)
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    disjoint = text_metrics(["alpha beta gamma delta epsilon"], ["one two three four five"])
    assert disjoint == {"bleu4": 0.0, "rouge_l": 0.0}
    assert all(math.isnan(v) for v in TextMetricAccumulator().compute().values())


def test_text_metrics_known_values():
    # torchmetrics' documented examples
    assert text_metrics(["My name is John"], ["Is your name John"])["rouge_l"] == pytest.approx(0.5)
    bleu = text_metrics(
        ["the cat is on the mat"], [["there is a cat on the mat", "a cat is on the mat"]]
    )["bleu4"]
    assert bleu == pytest.approx(0.7598, abs=1e-4)


def test_text_metrics_multiple_references_and_normalisation():
    preds = ["A circle in RED, on the left."]
    refs = [["a square in blue on the right", "a circle in red on the left"]]
    assert text_metrics(preds, refs) == {"bleu4": pytest.approx(1.0), "rouge_l": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="no reference"):
        text_metrics(["a"], [[]])


def test_text_metrics_independent_of_batching_and_order():
    preds = [s.replace("red", "blue").replace("left", "middle") for s in SENTENCES] * 3
    refs = [[s, s.upper()] for s in SENTENCES] * 3
    whole = text_metrics(preds, refs)
    assert 0.0 < whole["bleu4"] < 1.0 and 0.0 < whole["rouge_l"] < 1.0
    for chunk in (1, 4, 7):
        order = list(range(len(preds)))
        random.Random(chunk).shuffle(order)
        acc = TextMetricAccumulator()
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            acc.update([preds[i] for i in idx], [refs[i] for i in idx])
        assert acc.count == len(preds)
        streamed = acc.compute()
        assert streamed["bleu4"] == pytest.approx(whole["bleu4"], abs=1e-6)
        assert streamed["rouge_l"] == pytest.approx(whole["rouge_l"], abs=1e-6)


def test_perplexity():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one token"):
        perplexity(1.0, 0)


# ----------------------------------------------------------------------------- comparisons


def test_relative_improvement_signs():
    assert relative_improvement(0.5, 0.6) == pytest.approx(0.2)
    assert relative_improvement(0.5, 0.4) == pytest.approx(-0.2)
    assert relative_improvement(0.5, 0.4, higher_is_better=False) == pytest.approx(0.2)
    assert relative_improvement(-2.0, -1.0) == pytest.approx(0.5)
    assert relative_improvement(0.0, 0.0) == 0.0
    assert math.isnan(relative_improvement(0.0, 0.1))
    assert math.isnan(relative_improvement(math.nan, 0.1))


def test_average_relative_improvement():
    ntp = {"choice_accuracy": 0.5, "chair_i": 0.2, "test_counter/perplexity": 10.0}
    prior = {"choice_accuracy": 0.6, "chair_i": 0.1, "test_counter/perplexity": 12.0}
    assert average_relative_improvement(ntp, prior) == pytest.approx((0.2 + 0.5 - 0.2) / 3)
    assert average_relative_improvement(
        {"a": 1.0, "b": 0.0}, {"a": 2.0, "b": 1.0}, {"a": True, "b": True}
    ) == pytest.approx(1.0)  # b is nan (ntp == 0) and left out
    with pytest.raises(KeyError, match="no direction"):
        average_relative_improvement({"a": 1.0}, {"a": 2.0}, {})
    with pytest.raises(KeyError, match="missing"):
        average_relative_improvement({"bleu4": 1.0}, {})
    with pytest.raises(KeyError, match="No direction known"):
        higher_is_better("mystery")
    assert not METRIC_DIRECTIONS["prior_pick_rate"] and not METRIC_DIRECTIONS["chair_s"]


# ----------------------------------------------------------------------------- curves


def test_area_under_curve_is_mean_level():
    assert area_under_curve([0, 100, 300], [0.0, 1.0, 1.0]) == pytest.approx((50 + 200) / 300)
    assert area_under_curve([10], [0.7]) == 0.7
    with pytest.raises(ValueError, match="strictly increasing"):
        area_under_curve([0, 0], [1.0, 2.0])


def test_steps_to_threshold_interpolates():
    steps, values = [0, 100, 200, 300], [0.0, 0.4, 0.8, 0.6]
    assert steps_to_threshold(steps, values, 0.6) == pytest.approx(150.0)
    assert steps_to_threshold(steps, values, 0.0) == 0.0
    assert steps_to_threshold(steps, values, 0.9) is None
    losses = [4.0, 3.0, 2.0, 1.0]
    assert steps_to_threshold(steps, losses, 2.5, higher_is_better=False) == pytest.approx(150.0)


def test_power_law_fit_recovers_exact_law():
    steps = [10, 20, 50, 100, 1000]
    a, b, r2 = power_law_fit(steps, [3.0 * s**-0.4 for s in steps])
    assert (a, b, r2) == (pytest.approx(3.0), pytest.approx(-0.4), pytest.approx(1.0))
    a, b, _ = power_law_fit([0, 10, 100, 200], [5.0, 0.5 * 10**0.3, 0.5 * 100**0.3, -1.0])
    assert (a, b) == (pytest.approx(0.5), pytest.approx(0.3))
    with pytest.raises(ValueError, match="at least 2 points"):
        power_law_fit([10, 20], [1.0, 0.0])


# ----------------------------------------------------------------------------- benchmarks


def test_coco_caption_reader_skips_and_counts_bad_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(png_bytes(size=(40, 30)))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    annotations = {
        "images": [
            {"id": 1, "file_name": "good.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "missing.png"},
            {"id": 3, "file_name": "corrupt.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "A red box."},
            {"image_id": 2, "caption": "Nothing here."},
            {"image_id": 1, "caption": "  a red square  "},
            {"image_id": 3, "caption": "Broken."},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(annotations))
    stream = coco_caption_items(path, images, image_size=16)
    items = list(stream)
    assert len(items) == 1
    item = items[0]
    assert isinstance(item, EvalItem)
    assert item.key == "1" and item.reference == "A red box."
    assert item.meta["references"] == ["A red box.", "a red square"]
    assert item.candidates == {} and item.truth_objects is None
    assert item.image.shape == (3, 16, 16) and 0.0 <= item.image.min() <= item.image.max() <= 1.0
    assert stream.skipped["missing_field"] == 1 and stream.skipped["bad_image"] == 1
    assert sum(stream.skipped.values()) == 2
    preds = [item.reference]
    assert text_metrics(preds, [item.meta["references"]])["rouge_l"] == pytest.approx(1.0)


def test_coco_caption_reader_rejects_other_formats(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="COCO captions format"):
        coco_caption_items(path, tmp_path)
    with pytest.raises(ValueError, match="needs benchmark.annotations"):
        CocoCaptions(annotations=None, images=str(tmp_path))


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = CorpusConfig(seed=1, splits={"test_counter": SplitSpec(16, 2)}, num_workers=1)
    generate_corpus(cfg, out)
    return out


def test_demo_items_yield_every_sample_with_counterfactuals(demo_corpus):
    stream = DemoBenchmark(demo_corpus).items("test_counter")
    items = list(stream)
    assert len(items) == 16 and len({i.key for i in items}) == 16
    assert sum(stream.skipped.values()) == 0
    for item in items:
        assert item.image.shape == (3, 32, 32)
        assert item.reference == item.meta["description"]
        assert item.truth_objects == item.meta["objects"]
        assert set(item.candidates) == {"color", "shape", "count", "position"}
        assert item.candidates["color"]
        assert all(c != item.reference for cs in item.candidates.values() for c in cs)
        typical = typical_color_counterfactuals(item.meta)
        assert typical and set(typical) <= set(item.candidates["color"])
    assert len(list(DemoBenchmark(demo_corpus).items("test_counter", limit=5))) == 5


def test_demo_items_skip_samples_without_ground_truth(tmp_path):
    write_img2dataset_shards(tmp_path / "plain", num_shards=1, per_shard=3)
    stream = DemoBenchmark(tmp_path).items("plain")
    assert list(stream) == []
    assert stream.skipped["missing_field"] == 3


def _choices(items: list[EvalItem], score) -> tuple[dict, float]:
    """Choice results per attribute and the prior-pick rate of ``score(item, text)``."""
    true = [score(item, item.reference) for item in items]
    by_attr = choice_accuracy_by_attribute(
        true,
        [{a: [score(item, c) for c in cs] for a, cs in item.candidates.items()} for item in items],
    )
    pairs = [
        (t, score(item, typical))
        for item, t in zip(items, true, strict=True)
        for typical in typical_color_counterfactuals(item.meta)
    ]
    return by_attr, prior_pick_rate([p[0] for p in pairs], [p[1] for p in pairs])


def test_grounded_scorer_wins_and_prior_scorer_fails_test_counter(demo_corpus):
    items = list(DemoBenchmark(demo_corpus).items("test_counter"))

    def grounded(item: EvalItem, text: str) -> float:
        return 1.0 if text == item.reference else 0.0

    by_attr, pick = _choices(items, grounded)
    assert by_attr["color"].scored == 16
    assert all(r.accuracy == 1.0 for r in by_attr.values() if r.scored)
    assert pick == 0.0

    def prior_only(item: EvalItem, text: str) -> float:
        return float(sum(o["color"] == TYPICAL_COLOR[o["shape"]] for o in parse_description(text)))

    by_attr, pick = _choices(items, prior_only)
    assert by_attr["color"].accuracy == 0.0
    assert pick == 1.0
