"""Evaluation at regular steps during LVLM training, for learning curves.

``PeriodicEval`` evaluates the module's LVLM (``pl_module.model`` with ``pl_module.tokenizer``)
on splits of any ``Benchmark`` (``conf/callbacks/periodic_eval.yaml``) every ``every_n_steps``
optimizer steps and once more when training ends
(unless that step was just evaluated). Each evaluation logs ``eval/<split>/<metric>`` to the
trainer's loggers at the current step (and to wandb a table of sample generations,
``eval/<split>/samples``: ``prior.eval.evaluator.log_results``) and appends one JSON line per split,
``{"step": global_step, "split": ..., **metrics}``, to ``<default_root_dir>/eval_curve.jsonl``.
The latest results stay in ``PeriodicEval.last_results`` (with sample generations).

Only global rank 0 evaluates, so under DDP the other ranks wait at their next collective while
it runs; sharded strategies (FSDP, DeepSpeed) are refused, since one rank cannot run a sharded
model alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from prior.eval.benchmarks import Benchmark, EvalItem
from prior.eval.evaluator import EvalResult, evaluate, log_results

CURVE_FILE = "eval_curve.jsonl"


class PeriodicEval(L.Callback):
    """Evaluate on ``splits`` of ``benchmark`` every ``every_n_steps`` optimizer steps.

    The first ``limit`` items of each split (all when None) are read once, at setup, and kept in
    memory. ``batch_size``, ``max_new_tokens``, ``max_length`` and ``generate`` go to
    ``evaluate``; the benchmark's image size and resizing must match the training data's.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        splits: Sequence[str] = ("test", "test_counter"),
        every_n_steps: int = 100,
        limit: int | None = 128,
        batch_size: int = 64,
        max_new_tokens: int = 48,
        max_length: int = 80,
        generate: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.benchmark = benchmark
        self.splits = list(splits)
        self.every_n_steps = every_n_steps
        self.limit = limit
        self.eval_kwargs: dict[str, Any] = {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_length": max_length,
            "generate": generate,
        }
        self.items: dict[str, list[EvalItem]] = {}
        self.last_results: dict[str, EvalResult] = {}
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read and cache each split's items (rank 0 only)."""
        if stage != "fit" or not trainer.is_global_zero or self.items:
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(
                f"PeriodicEval runs the model on rank 0 alone, which a sharded strategy ({strategy}) "
                "cannot do: drop the callback (`~callbacks.periodic_eval`) and run `prior-eval` on "
                "the exported model or its checkpoints."
            )
        for split in self.splits:
            stream = self.benchmark.items(split, self.limit)
            self.items[split] = list(stream)
            if not self.items[split]:
                raise ValueError(f"No evaluation items in split {split!r} ({stream.skipped or 'none skipped'}).")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Evaluate after every ``every_n_steps``-th optimizer step."""
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate the final model unless its step was just evaluated."""
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate every split once for the current step, log and append to the curve file."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        with trainer.precision_plugin.forward_context():
            self.last_results = {
                split: evaluate(
                    pl_module.model, pl_module.tokenizer, items, benchmark=self.benchmark, **self.eval_kwargs
                )
                for split, items in self.items.items()
            }
        log_results(trainer.loggers, self.last_results, step)
        path = Path(trainer.default_root_dir) / CURVE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for split, result in self.last_results.items():
                f.write(json.dumps({"step": step, "split": split, **result.metrics}) + "\n")
