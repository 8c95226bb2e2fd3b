"""What the training entry points share: seeding, instantiation of config groups, the fit call."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from prior.callbacks import NonFiniteError, non_finite_tensors
from prior.cli._hydra import CONF_DIR
from prior.config import to_plain
from prior.strategies import full_state_dict, is_sharded
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


def resolve_ckpt_path(spec: str | None, output_dir: str | Path, *, allow_remote: bool = False) -> str | None:
    """The checkpoint a run resumes from.

    ``last``: the run folder's own ``checkpoints/last.ckpt`` or, when newer, the ``hpc_ckpt_*.ckpt``
    that Lightning writes there before a SLURM requeue (name the folder with
    ``hydra.run.dir=<run>``), an error when there is none; ``auto``: the same, or a fresh start
    when there is none (a requeued job that may not have checkpointed yet); a path: that file,
    which must exist; a URL: refused unless ``allow_remote_ckpt=true``, since a checkpoint is
    unpickled when it is loaded."""
    if spec in (None, ""):
        return None
    spec = str(spec)
    if spec in ("last", "auto"):
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        # Lightning's SLURM plugin writes hpc_ckpt_<n>.ckpt into the run folder on SIGUSR1 (requeue)
        # (a sharded FSDP checkpoint is a folder of that name)
        found = [p for p in [last, *Path(output_dir).glob("hpc_ckpt_*.ckpt")] if p.exists()]
        if found:
            return str(max(found, key=lambda p: p.stat().st_mtime))
        if spec == "auto":
            log.info("ckpt_path=auto: no %s yet, starting from step 0", last)
            return None
        raise FileNotFoundError(
            f"ckpt_path=last resumes the run folder's checkpoints/last.ckpt, and {last} does not exist. "
            "Name the run to resume with hydra.run.dir=<its folder> (a new run gets a new folder), give "
            "the checkpoint's path, or use ckpt_path=auto to start fresh when there is none."
        )
    if "://" in spec:
        if not allow_remote:
            raise ValueError(
                f"ckpt_path={spec} is remote. Loading a checkpoint unpickles it, so remote ones are refused: "
                "copy it locally, or set allow_remote_ckpt=true if you trust its source."
            )
        return spec
    if not Path(spec).exists():  # a file, or the folder of a sharded FSDP checkpoint
        raise FileNotFoundError(f"ckpt_path={spec} does not exist.")
    return spec


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """The composed config, resolved, as the run will use it (``print_config: false`` to skip)."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001  (a value that resolves only later, e.g. outside a Hydra run)
        text = OmegaConf.to_yaml(cfg)
    print(text, flush=True)


def fit(cfg: DictConfig) -> tuple[L.Trainer, L.LightningModule, L.LightningDataModule]:
    """Seed, build data, model and trainer from ``cfg`` and train (resuming from ``ckpt_path``)."""
    if cfg.get("ckpt_path") is not None:
        with open_dict(cfg):
            cfg.ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir,
                                              allow_remote=bool(cfg.get("allow_remote_ckpt", False)))
    if cfg.get("print_config", False):
        print_config(cfg)
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


def export_atomically(model: L.LightningModule, folder: str | Path) -> Path:
    """``model.export`` into a temporary folder beside ``folder``, then swapped in: a killed or
    failed export never leaves a half-written model where the previous one was, and a model with
    non-finite parameters is refused (the previous export stays)."""
    folder = Path(folder)
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise NonFiniteError(
            f"Refusing to export to {folder}: {len(bad)} parameter tensor(s) are not finite (first: {bad[0]})."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        model.export(tmp)
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def unsharded_copy(cfg: DictConfig, state: dict[str, Any]) -> L.LightningModule:
    """A fresh ``cfg.model`` holding ``state`` (a gathered full state dict); an error when a
    trained parameter is missing from it."""
    model = instantiate(cfg.model, _recursive_=False)
    result = model.load_state_dict(state, strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trained)
    if missing:
        raise RuntimeError(f"The gathered state dict lacks {len(missing)} trained parameter(s) (first: {missing[0]}).")
    return model


def train_and_export(cfg: DictConfig, what: str) -> dict[str, float]:
    """``fit``, then (on rank 0) export ``model`` to ``cfg.export_dir`` atomically; the final
    logged metrics."""
    trainer, model, _ = fit(cfg)
    if is_sharded(trainer.strategy):
        # FSDP: gather the whole model to rank 0 (every rank joins) and export an unsharded copy
        state = full_state_dict(trainer.strategy)
        if trainer.is_global_zero:
            model = unsharded_copy(cfg, state)
    if trainer.is_global_zero:
        print(f"{what} exported to {export_atomically(model, cfg.export_dir)}")
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
