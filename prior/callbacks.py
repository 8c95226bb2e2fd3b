"""Callbacks shared by the stages."""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


class SkipReport(L.Callback):
    """Logs the bad-input counters of the datamodule (``data/skipped_<reason>``) and prints a
    summary when a run ends, so skipped samples are never silent."""

    def _counts(self, trainer: L.Trainer) -> dict[str, int]:
        counter = getattr(trainer.datamodule, "counter", None)
        return counter.totals() if counter is not None else {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            for reason, n in self._counts(trainer).items():
                pl_module.log(f"data/skipped_{reason}", float(n), reduce_fx="sum", sync_dist=False)

    def _report(self, trainer: L.Trainer) -> None:
        counter = getattr(trainer.datamodule, "counter", None)
        line = counter.report() if counter is not None else ""
        if line:
            log.warning(line)
            print(line)

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._report(trainer)

    def on_predict_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._report(trainer)


class RNGState(L.Callback):
    """Saves the Python, NumPy and torch random states in checkpoints and restores them on resume
    (as plain lists and tensors, so checkpoints still load with ``weights_only``)."""

    def state_dict(self) -> dict:  # noqa: D102
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
