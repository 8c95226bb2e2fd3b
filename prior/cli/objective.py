"""What a training entry point returns to Hydra: the value an hparams search optimises.

An ``hparams_search=...`` config (conf/hparams_search/, Hydra's Optuna sweeper) names the metric
it optimises in ``optimized_metric``; the entry point returns that metric's final value for every
trial. Outside a search the entry point returns its usual metric, or None when it was not logged.

- a trial that diverges (``NonFiniteError``, or a non-finite metric) gets the worst value (+inf
  when minimising, -inf when maximising): a bad learning rate is a bad trial, not the end of the
  search;
- a trial that never logged the metric (validation never ran, or a misspelt name) is an error
  naming the fix: the search's ``max_failure_rate: 0`` stops it at the first trial instead of
  spending every trial on a misconfiguration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from prior.callbacks import NonFiniteError

log = logging.getLogger(__name__)


def _worst(cfg: DictConfig) -> float:
    """The worst value for the running search's direction (``hydra.sweeper.direction``)."""
    from hydra.core.hydra_config import HydraConfig

    direction = "minimize"
    if HydraConfig.initialized():
        direction = str(OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="minimize"))
    return -math.inf if "maximize" in direction else math.inf


def train_trial(train: Callable[[DictConfig], dict[str, float]], cfg: DictConfig) -> dict[str, float]:
    """``train(cfg)``'s final metrics; in an hparams search (``optimized_metric`` set) a run stopped
    by a NaN/inf (``NonFiniteError``) returns the worst value of that metric instead of raising."""
    metric = cfg.get("optimized_metric")
    try:
        return train(cfg)
    except NonFiniteError as err:
        if metric is None:
            raise
        worst = _worst(cfg)
        log.warning("This trial diverged (%s); it counts as %s = %s.", err, metric, worst)
        return {metric: worst}


def objective(metrics: dict[str, float], cfg: DictConfig, default: str) -> float | None:
    """The value the entry point returns: ``metrics[optimized_metric]`` in an hparams search (an
    error when absent, the worst value when not finite), else ``metrics[default]`` or None."""
    metric = cfg.get("optimized_metric")
    if metric is None:
        value = metrics.get(default)
        return None if value is None else float(value)
    if metric not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise ValueError(
            f"The hparams search optimises {metric!r}, which this run never logged (logged: {logged}). "
            "Validation must run before training ends: trainer.val_check_interval <= trainer.max_steps "
            "and trainer.limit_val_batches > 0; or name a logged metric with optimized_metric=<name>."
        )
    value = float(metrics[metric])
    return value if math.isfinite(value) else _worst(cfg)
