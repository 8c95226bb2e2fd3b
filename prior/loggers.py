"""Logger construction: wandb offline by default, every file under the run folder, resumable runs.

``wandb_logger`` returns Lightning's WandbLogger in offline mode unless the user chose a mode
(``WANDB_MODE``) or is logged in (``WANDB_API_KEY`` or a netrc entry for the wandb host); offline
runs are synced later with ``wandb sync <run folder>/wandb/offline-run-*``. No entity or project
is built in: they come from the config or the ``WANDB_ENTITY`` / ``WANDB_PROJECT`` variables.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
_WANDB_DIRS = {"WANDB_DIR": "", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config", "WANDB_DATA_DIR": "data"}
_SET_HERE: set[str] = set()  # the variables this module set (moved to each new run folder)


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_logger(save_dir: str, resume_from: str | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger writing under ``save_dir``; offline unless a mode or a login says otherwise.

    ``resume_from`` (a checkpoint path) continues the wandb run of the run that wrote it.
    """
    root = Path(save_dir)
    for var, sub in _WANDB_DIRS.items():
        if var not in os.environ or var in _SET_HERE:
            path = root / "wandb" / sub if sub else root
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)
            _SET_HERE.add(var)
    offline = os.environ.get("WANDB_MODE", "offline" if not _logged_in() else "online") == "offline"
    if offline and "WANDB_MODE" not in os.environ:
        log.info("wandb runs offline (no login found); sync later with `wandb sync %s/wandb/offline-run-*`", root)
    if resume_from:
        id_file = Path(resume_from).resolve().parent.parent / RUN_ID_FILE
        if id_file.exists():
            kwargs["id"] = id_file.read_text().strip()
            kwargs["resume"] = "allow"
    logger = WandbLogger(save_dir=str(root), offline=offline, **kwargs)
    return logger


def remember_run_ids(loggers: list[Any], output_dir: str) -> None:
    """Write the wandb run id beside the checkpoints so a resumed run continues it."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / RUN_ID_FILE).write_text(lg.experiment.id)


def finish_runs(loggers: list[Any]) -> None:
    """Close the wandb runs of a finished fit, so its files are complete and a next job in the
    same process (a Hydra multirun) starts a run of its own."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()
