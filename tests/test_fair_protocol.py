"""The fair evaluation protocol: length-fair choices, a parser that forgives dropped function
words, per-kind NLL, error-based scaling and the pre-registered protocol config."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import prior.eval.evaluator as evaluator
from prior.demo.corpus import parse_description
from prior.data.tokenization import load_tokenizer
from prior.demo.benchmark import DemoBenchmark, demo_items
from prior.demo.token_kinds import token_labels
from prior.eval.benchmarks import EvalItem
from prior.eval.compare import Protocol, comparison_table, protocol_report, summarize
from prior.eval.metrics import generation_metrics
from tests.test_lvlm_training import lvlm_cfg

LONG_TRUE = "two shapes: a large circle in red on the left and a small square in blue on the right"
SHORT_FALSE = "one shape: a large circle in red on the left"


def test_choice_prefers_the_likelier_longer_candidate(demo, monkeypatch):
    """Every token of the longer (true) description is likelier than every token of the shorter
    one, but its summed log-probability is lower: a summed score picks the shorter."""
    tokenizer = load_tokenizer(demo.tokenizer)
    n_long = len(evaluator._caption_ids(tokenizer, LONG_TRUE, 80, with_eos=False)) - 1
    n_short = len(evaluator._caption_ids(tokenizer, SHORT_FALSE, 80, with_eos=False)) - 1
    assert n_long > 1.5 * n_short

    def fake_score(lvlm, tok, images, pairs, batch_size):
        return [[-0.5] * (len(ids) - 1) if len(ids) - 1 >= n_long else [-0.7] * (len(ids) - 1) for _, ids in pairs]

    monkeypatch.setattr(evaluator, "_score", fake_score)
    assert 0.5 * n_long > 0.7 * n_short  # the summed score of the true description is the lower one
    item = EvalItem("k", torch.zeros(3, 32, 32), LONG_TRUE, candidates={"count": [SHORT_FALSE]})
    result = evaluator.evaluate(nn.Linear(1, 1), tokenizer, [item], generate=False)
    assert result.metrics["choice_accuracy_count"] == 1.0
    assert evaluator.choice_score([-0.5] * n_long) > evaluator.choice_score([-0.7] * n_short)
    assert evaluator.choice_score([]) == -math.inf


def test_a_dropped_function_word_is_not_a_hallucination():
    truth = [
        {"shape": "circle", "color": "red", "size": "large", "position": "left"},
        {"shape": "square", "color": "blue", "size": "small", "position": "right"},
    ]
    for text in (
        "two shapes: a large circle red on the left and a small square blue on the right",  # no "in"
        "two shapes: large circle in red left and small square in blue right",  # no "a", "on the"
        "two shapes: a large circle in red on the left and a small square in blue on the right",
    ):
        parsed = parse_description(text)
        assert parsed == truth, text
        metrics = generation_metrics([parsed], [truth])
        assert metrics["color_hallucination"] == 0 and metrics["chair_i"] == 0
    # the other word order still binds a colour to the shape after it
    assert parse_description("a small red circle and a large blue square")[1]["color"] == "blue"


def test_per_kind_nll_is_reported_per_kind_of_token(demo):
    tokenizer = load_tokenizer(demo.tokenizer)
    torch.manual_seed(0)
    model = instantiate(lvlm_cfg(demo, "loss=ntp").model, _recursive_=False).model
    items = list(demo_items(demo.data / "test_counter", limit=6))
    fast = {"generate": False, "max_length": 80}
    m = evaluator.evaluate(model, tokenizer, items, benchmark=DemoBenchmark(demo.data), **fast).metrics
    kinds = ("visual", "function", "boilerplate", "noise", "eos")
    assert {f"nll_{k}" for k in (*kinds, "color_counter")} <= m.keys()
    assert all(m[f"nll_{k}"] > 0 for k in kinds)
    plain = evaluator.evaluate(model, tokenizer, items, **fast).metrics
    assert not any(k.startswith("nll_") for k in plain) and plain["nll"] == pytest.approx(m["nll"])
    # every scored token has one coarse kind, so the kinds' NLL, weighted by their token
    # counts, add up to the whole-caption NLL
    n = {k: 0 for k in kinds}
    for item in items:
        caption = item.meta["caption"]
        scored = len(evaluator._caption_ids(tokenizer, caption, 80, with_eos=True)) - 1
        for token in token_labels(tokenizer, caption, item.meta, scored):
            coarse = [k for k in token if k in kinds]
            assert len(coarse) == 1, token
            n[coarse[0]] += 1
    total = sum(n.values())
    assert sum(m[f"nll_{k}"] * n[k] for k in kinds) / total == pytest.approx(m["nll"], rel=1e-6)


def _curve(metric: str, values: list[float]) -> dict:
    return {metric: [(100 * (i + 1), v) for i, v in enumerate(values)]}


def test_scaling_fits_the_error_not_the_accuracy():
    metric = "test_counter/choice_accuracy_color"
    steps = [100, 200, 400, 800]
    # error halves with every doubling of steps: slope exactly -1
    curve = {metric: [(s, 1 - 0.8 * 100 / s) for s in steps]}
    assert summarize([curve], metric).error_slope[0] == pytest.approx(-1.0)
    # a lower-is-better rate is its own error
    rate = "test_counter/prior_pick_rate"
    assert summarize([{rate: [(s, 0.8 * 100 / s) for s in steps]}], rate).error_slope[0] == pytest.approx(-1.0)


def test_the_protocol_config_averages_tables_separately():
    protocol = Protocol.load("demo")
    assert "test_counter/choice_accuracy_color" in protocol.likelihood
    assert not set(protocol.likelihood) & set(protocol.generation)
    assert all("nll" in m for m in protocol.nll) and not any("nll" in m for m in protocol.likelihood)
    up, down = "test_counter/choice_accuracy_color", "test_counter/nll_visual"
    ntp = [{**_curve(up, [0.2, 0.4]), **_curve(down, [2.0, 1.0])}]
    prior = [{**_curve(up, [0.3, 0.6]), **_curve(down, [3.0, 2.0])}]
    table, avg = comparison_table(ntp, prior, [up, down])
    assert avg["final"] == pytest.approx(0.5)  # nll is shown but not averaged
    assert "-100.0%" in table  # nll 1.0 -> 2.0, lower is better
    small = Protocol(likelihood=(up,), nll=(down,), thresholds={up: 0.5}, gate={"metric": up, "min": 0.25})
    report, averages = protocol_report(ntp, prior, small)
    assert averages["likelihood_final"] == pytest.approx(0.5) and "generation_final" not in averages
    assert "steps to 0.5 | never | 167 |" in report
    assert small.passes_gate(ntp) == (True, 0.4)
    strict = Protocol(likelihood=(up,), gate={"metric": up, "min": 0.5})
    assert not strict.passes_gate(ntp)[0]
    report, averages = protocol_report(ntp, prior, strict)  # NTP does not read the image: no verdict
    assert averages == {} and report.startswith("**Invalid under the validity gate**")
    assert "average relative change" not in report


def test_the_average_change_comes_with_its_spread_over_seeds():
    m = "test_counter/choice_accuracy_color"
    ntp = [{m: [(1, 0.2), (2, 0.4)]}, {m: [(1, 0.2), (2, 0.5)]}]
    prior = [{m: [(1, 0.3), (2, 0.6)]}, {m: [(1, 0.3), (2, 0.5)]}]
    table, avg = comparison_table(ntp, prior, [m])
    # seed by seed: +50% and 0% -> std 25%; the headline compares the seed means (0.45 -> 0.55)
    assert avg["final"] == pytest.approx(0.55 / 0.45 - 1)
    assert "**+22.2%** ± 25.0%" in table
    assert "±" not in comparison_table(ntp[:1], prior[:1], [m])[0].splitlines()[-1]
