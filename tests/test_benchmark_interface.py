"""The benchmark interface: a toy benchmark defined here runs through `prior-eval` and
PeriodicEval, and evaluation code never imports the shape world."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from prior.cli.common import build_datamodule
from prior.cli.eval import run_eval
from prior.data.pipeline import SkipCounter
from prior.eval.benchmarks import Benchmark, EvalItem, ItemStream
from prior.eval.callback import CURVE_FILE, PeriodicEval
from tests.conftest import compose_config
from tests.test_lvlm_training import lvlm_cfg

WORDS = ("red", "blue", "green")


class ToyBenchmark(Benchmark):
    """Plain-colour images; the reference names the colour, the candidates the other two."""

    default_splits = ("alpha", "beta")

    def items(self, split: str, limit: int | None = None) -> ItemStream:
        n = 5 if limit is None else min(5, limit)
        rgb = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0)}

        def gen():  # noqa: ANN202
            for i in range(n):
                word = WORDS[(i + len(split)) % 3]
                image = torch.tensor(rgb[word]).view(3, 1, 1).expand(3, 32, 32).clone()
                others = [f"a {w} square" for w in WORDS if w != word]
                yield EvalItem(f"{split}{i}", image, f"a {word} square", candidates={"color": others},
                               meta={"caption": f"a {word} square"})

        return ItemStream(gen(), SkipCounter())

    def postprocess(self, generation: str) -> str:
        return generation.strip().lower()

    def token_labels(self, tokenizer, caption, meta, n):  # noqa: ANN001, ANN201
        return [("word",)] * n


def test_toy_benchmark_through_prior_eval(demo, tmp_path):
    torch.manual_seed(0)
    export = instantiate(lvlm_cfg(demo, "loss=ntp").model, _recursive_=False).export(tmp_path / "export")
    cfg = compose_config("eval", demo.root, [f"model={export}", "max_new_tokens=4", f"paths.output_dir={tmp_path}/run"])
    with open_dict(cfg):
        cfg.benchmark = OmegaConf.create({"_target_": f"{__name__}.ToyBenchmark"})
    results = run_eval(cfg)
    assert list(results) == ["alpha", "beta"]  # the benchmark's default splits
    for result in results.values():
        assert result.num_items == 5
        assert {"choice_accuracy", "choice_accuracy_color", "nll", "nll_word", "bleu4"} <= set(result.metrics)
        assert result.metrics["nll_word"] == result.metrics["nll"]  # every token is a "word"
        assert "prior_pick_rate" not in result.metrics and "chair_i" not in result.metrics  # hooks it lacks
    assert set(json.loads((tmp_path / "run" / "eval.json").read_text())) == {"alpha", "beta"}


def test_toy_benchmark_through_periodic_eval(demo, tmp_path):
    cfg = lvlm_cfg(demo, "loss=ntp")
    module = instantiate(cfg.model, _recursive_=False)
    callback = PeriodicEval(ToyBenchmark(), splits=["beta"], every_n_steps=2, limit=3, max_new_tokens=4)
    trainer = L.Trainer(max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module, datamodule=build_datamodule(cfg))
    points = [json.loads(line) for line in (tmp_path / CURVE_FILE).read_text().splitlines()]
    assert [(p["step"], p["split"]) for p in points] == [(2, "beta"), (3, "beta")]
    assert all("choice_accuracy_color" in p and "nll_word" in p for p in points)


def test_evaluation_code_does_not_import_the_shape_world():
    code = (
        "import sys, prior.eval.evaluator, prior.eval.callback, prior.eval.compare, prior.eval.benchmarks, "
        "prior.eval.metrics, prior.eval.token_weights, prior.cli.eval; "
        "print([m for m in sys.modules if m.startswith('prior.demo')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
