"""What the training entry points share: seeding, instantiation of config groups, the fit call."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prior.cli._hydra import CONF_DIR
from prior.config import to_plain
from prior.weighting import build_weighting
from prior.loggers import finish_runs, remember_run_ids

log = logging.getLogger(__name__)


def compose_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """Compose one of the project's root configs (as its entry point would) with overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: use its search path
        return compose(name, overrides=list(overrides))
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a named group (callbacks, loggers); null entries are dropped."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured callbacks and loggers."""
    return instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The datamodule of ``cfg.data``; with a ``loss`` config (stage 3) its batches carry the
    stage-2 weights exactly when the weighting scheme reads them from the sidecars."""
    extra = {}
    if cfg.get("loss") is not None:
        extra["with_weights"] = build_weighting(to_plain(cfg.loss)).needs_sidecars
    return instantiate(cfg.data, **extra)


def fit(cfg: DictConfig) -> tuple[L.Trainer, L.LightningModule, L.LightningDataModule]:
    """Seed, build data, model and trainer from ``cfg`` and train (resuming from ``ckpt_path``)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model, _recursive_=False)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        remember_run_ids(trainer.loggers, cfg.paths.output_dir)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        finish_runs(trainer.loggers)
    return trainer, model, datamodule


def train_and_export(cfg: DictConfig, what: str) -> dict[str, float]:
    """``fit``, then (on rank 0) ``model.export(cfg.export_dir)``; the final logged metrics."""
    trainer, model, _ = fit(cfg)
    if trainer.is_global_zero:
        print(f"{what} exported to {model.export(cfg.export_dir)}")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
