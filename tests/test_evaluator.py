"""Running an LVLM over benchmarks: scoring, batch-size invariance, results, prior-eval, PeriodicEval."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from hydra.utils import instantiate

import prior
from prior.cli.eval import main as eval_main
from prior.cli.eval import run_eval
from prior.cli.train_lvlm import train_lvlm
from prior.data.tokenization import encode_caption
from prior.demo.benchmark import DemoBenchmark, demo_description, demo_items
from prior.eval.evaluator import EvalResult, evaluate, sequence_logprobs, write_results
from prior.loss import token_cross_entropy
from tests.conftest import compose_config
from tests.helpers import png_bytes
from tests.test_lvlm_training import lvlm_cfg

EVAL_FAST = {"max_new_tokens": 8, "max_length": 80}


@pytest.fixture(scope="module")
def module(demo):
    """An untrained tiny LVLMModule from the real config (random weights, train mode)."""
    torch.manual_seed(0)
    return instantiate(lvlm_cfg(demo, "loss=ntp").model, _recursive_=False)


@pytest.fixture(scope="module")
def items(demo):
    """The first items of test_counter (counter-prior objects, so every metric has data)."""
    return list(demo_items(demo.data / "test_counter", limit=9))


def test_sequence_logprobs_is_the_summed_token_log_likelihood(module, items):
    lvlm, tok = module.model, module.tokenizer
    item = items[0]
    texts = [item.reference, item.candidates["color"][0], item.meta["caption"]]
    images = item.image[None].expand(len(texts), -1, -1, -1)
    assert lvlm.training
    scores = sequence_logprobs(lvlm, tok, images, texts, batch_size=2)
    assert lvlm.training  # the mode is restored
    lvlm.eval()
    try:
        for text, score in zip(texts, scores, strict=True):
            ids = torch.tensor([encode_caption(tok, text)[:-1]])  # without EOS
            with torch.no_grad():
                out = lvlm(item.image[None], ids, torch.ones_like(ids, dtype=torch.bool))
            direct = -token_cross_entropy(out.logits, out.targets, out.loss_mask).sum().item()
            assert score == pytest.approx(direct, rel=1e-5)
    finally:
        lvlm.train()
    with_eos = sequence_logprobs(lvlm, tok, images, texts, with_eos=True)
    assert all(e < s for e, s in zip(with_eos, scores, strict=True))  # one more token to predict
    with pytest.raises(ValueError, match="one image per text"):
        sequence_logprobs(lvlm, tok, images[:1], texts)


def test_evaluate_does_not_depend_on_batch_size(demo, module, items):
    bench = DemoBenchmark(demo.data)
    results = [evaluate(module.model, module.tokenizer, items, batch_size=bs, benchmark=bench, **EVAL_FAST)
               for bs in (1, 7, 64)]
    first = results[0]
    expected = {"choice_accuracy", "choice_accuracy_color", "choice_accuracy_shape", "choice_accuracy_count",
                "choice_accuracy_position", "prior_pick_rate", "nll", "perplexity", "object_precision",
                "chair_i", "bleu4", "rouge_l"}
    assert expected <= set(first.metrics)
    assert first.num_items == len(items) and first.skipped == {}
    assert module.model.training
    for other in results[1:]:
        assert other.metrics.keys() == first.metrics.keys()
        for name, value in first.metrics.items():
            assert other.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        assert [s["generation"] for s in other.samples] == [s["generation"] for s in first.samples]
    assert first.samples[0]["key"] == items[0].key and first.samples[0]["truth"] == items[0].truth_objects


def test_demo_description_extracts_the_grammar_part():
    caption = ("Stock photo of two shapes: a large circle in red on the left and a small square in blue on the "
               "right. Photo by cam12 | free download")
    assert demo_description(caption) == (
        "two shapes: a large circle in red on the left and a small square in blue on the right"
    )
    assert demo_description("one shape: a small star in cyan in the middle") == (
        "one shape: a small star in cyan in the middle"
    )
    assert demo_description("  garbage text. more ") == "garbage text. more"


def test_write_results_json_and_markdown(tmp_path):
    results = {
        "test": EvalResult({"choice_accuracy": 0.5, "perplexity": 3.25}, num_items=4),
        "test_counter": EvalResult({"choice_accuracy": 0.25, "prior_pick_rate": 0.75}, num_items=3,
                                   skipped={"bad_image": 1}),
    }
    json_path, md_path = write_results(results, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["test_counter"] == {"metrics": {"choice_accuracy": 0.25, "prior_pick_rate": 0.75},
                                    "num_items": 3, "skipped": {"bad_image": 1}}
    lines = md_path.read_text().splitlines()
    assert lines[0] == "| metric | test | test_counter |"
    assert "| prior_pick_rate | - | 0.7500 |" in lines
    assert "| perplexity | 3.2500 | - |" in lines
    assert lines[-1] == "| items | 4 | 3 |"


def test_prior_eval_on_an_exported_model(demo, module, tmp_path):
    export = module.export(tmp_path / "export")
    cfg = compose_config("eval", demo.root, [f"model={export}", "limit=3", "batch_size=16", "max_new_tokens=6",
                                             f"paths.output_dir={tmp_path / 'run'}", "logger=csv"])
    eval_main.__wrapped__(cfg)
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(data) == {"test", "test_counter"}
    assert data["test"]["num_items"] == 3 and "choice_accuracy" in data["test"]["metrics"]
    assert "prior_pick_rate" in data["test_counter"]["metrics"] and data["test"]["skipped"] == {}
    assert "prior_pick_rate" not in data["test"]["metrics"]  # test follows the prior: no such choice
    assert "| metric | test | test_counter |" in (tmp_path / "run" / "eval.md").read_text()
    (metrics_csv,) = (tmp_path / "run" / "csv").glob("version_*/metrics.csv")
    row = next(csv.DictReader(metrics_csv.open()))
    assert float(row["eval/test_counter/choice_accuracy"]) == data["test_counter"]["metrics"]["choice_accuracy"]


def test_prior_eval_on_coco_captions_with_images_of_different_sizes(demo, module, tmp_path):
    export = module.export(tmp_path / "export")
    (tmp_path / "val2017").mkdir()
    for i, size in enumerate([(40, 30), (20, 32)]):
        (tmp_path / "val2017" / f"{i}.png").write_bytes(png_bytes(size=size))
    annotations = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)],  # image 2 has no caption
        "annotations": [{"image_id": 0, "caption": "a red circle"}, {"image_id": 0, "caption": "red"},
                        {"image_id": 1, "caption": "a square"}],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(annotations))
    cfg = compose_config("eval", demo.root, [
        f"model={export}", "benchmark=coco_captions", "benchmark.resize=none", "max_new_tokens=4",
        f"benchmark.annotations='{tmp_path}/captions_{{split}}2017.json'", f"benchmark.images='{tmp_path}/{{split}}2017'",
        f"paths.output_dir={tmp_path / 'run'}",
    ])
    results = run_eval(cfg)
    (result,) = results.values()
    assert list(results) == ["val"] and result.num_items == 2 and result.skipped == {"empty_caption": 1}
    assert set(result.metrics) == {"nll", "perplexity", "bleu4", "rouge_l"}  # no choices, no truth objects


def test_periodic_eval_appends_a_curve_point_every_n_steps(demo, tmp_path):
    cb = "callbacks.periodic_eval"
    cfg = lvlm_cfg(demo, "loss=ntp", "trainer.max_steps=5", "trainer.val_check_interval=1000",
                   "trainer.limit_val_batches=0", f"paths.output_dir={tmp_path / 'run'}",
                   f"export_dir={tmp_path / 'export'}", "callbacks=[default,periodic_eval]",
                   f"{cb}.every_n_steps=2", f"{cb}.limit=2", f"+{cb}.max_new_tokens=4")
    train_lvlm(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "eval_curve.jsonl").read_text().splitlines()]
    # every 2 steps, then the final step
    expected = [(step, split) for step in (2, 4, 5) for split in ("test", "test_counter")]
    assert [(p["step"], p["split"]) for p in lines] == expected
    assert all("choice_accuracy" in p and "perplexity" in p for p in lines)
    (metrics_csv,) = (tmp_path / "run" / "csv").glob("version_*/metrics.csv")
    logged = [r for r in csv.DictReader(metrics_csv.open()) if r.get("eval/test/choice_accuracy")]
    assert [int(r["step"]) for r in logged] == [2, 4, 5]


def test_prior_eval_prepares_images_as_the_model_was_trained(demo, module, tmp_path):
    """The export records the data's image_size and resize; prior-eval uses them unless told
    otherwise, and an export that records none is an error that says what to give."""
    from prior.cli.eval import with_model_preprocessing

    export = module.export(tmp_path / "export")
    lvlm, _ = prior.load(export)
    assert lvlm.preprocessing == {"image_size": 32, "resize": "center_crop"}
    cfg = compose_config("eval", demo.root, [f"model={export}", "benchmark=coco_captions"])
    assert cfg.benchmark.image_size is None
    filled = with_model_preprocessing(cfg.benchmark, lvlm.preprocessing, str(export))
    assert (filled.image_size, filled.resize) == (32, "center_crop")
    given = compose_config("eval", demo.root, [f"model={export}", "benchmark.image_size=64"])
    assert with_model_preprocessing(given.benchmark, lvlm.preprocessing, str(export)).image_size == 64
    with pytest.raises(ValueError, match="benchmark.image_size=224"):
        with_model_preprocessing(cfg.benchmark, None, str(export))


def test_evaluate_shows_a_progress_bar_when_named(demo, module, monkeypatch):
    import sys

    from tests.helpers import Terminal

    tok = module.tokenizer
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    evaluate(module.model, tok, demo_items(demo.data / "test", limit=3), generate=False, **EVAL_FAST)
    assert terminal.getvalue() == ""  # unnamed (inside training loops): no bar
    evaluate(module.model, tok, demo_items(demo.data / "test", limit=3), generate=False, progress="eval test",
             **EVAL_FAST)
    assert "eval test" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_prior_eval_logs_metrics_and_a_table_of_generations_to_wandb(demo, module, tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    export = module.export(tmp_path / "export")
    cfg = compose_config("eval", demo.root, [f"model={export}", "splits=[test_counter]", "limit=3", "max_new_tokens=4",
                                             f"paths.output_dir={tmp_path / 'run'}", "logger=wandb"])
    results = run_eval(cfg)
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert b"eval/test_counter/choice_accuracy" in next(offline.glob("*.wandb")).read_bytes()
    (path,) = (offline / "files" / "media" / "table" / "eval" / "test_counter").glob("samples_*.table.json")
    table = json.loads(path.read_text())
    assert table["columns"] == ["key", "image", "reference", "generated", "counter-prior choices"]
    samples = results["test_counter"].samples
    assert [row[0] for row in table["data"]] == [s["key"] for s in samples] and len(samples) == 3
    assert [row[3] for row in table["data"]] == [s["generation"] for s in samples]
    choices = [c for row in table["data"] for c in row[4].split("; ") if c]
    assert len(choices) == sum(len(s["prior_choices"]) for s in samples) > 0
    assert all(re.fullmatch(r"(picked|rejected) prior '.+' \(true - prior [+-]\d\.\d{3}\)", c) for c in choices)
    picks = [c["picked_prior"] for s in samples for c in s["prior_choices"]]
    assert sum(picks) / len(picks) == results["test_counter"].metrics["prior_pick_rate"]
