"""The SLURM example composes into real configs for both distributed presets."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import compose_config

SBATCH = Path(__file__).parents[1] / "experiments" / "slurm" / "train_lvlm.sbatch"
ENV = {"TRAINER:-ddp": "ddp", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "123",
       "(SLURM_CPUS_PER_TASK - 1)": "7"}


def _srun_overrides() -> list[str]:
    text = SBATCH.read_text()
    command = " ".join(line.rstrip("\\") for line in text[text.index("srun "):].splitlines())
    for var, value in ENV.items():
        command = command.replace(f"${{{var}}}", value).replace(f"${var}", value).replace(f"$({var})", value)
    args = shlex.split(command)
    args = args[args.index("prior.cli.train_lvlm") + 1:]
    assert args[-2:] == ["ckpt_path=auto", "$@"] and not any("$" in a for a in args[:-1])
    return [a for a in args[:-1] if not a.startswith("hydra.")]


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_slurm_example_composes_with_requeue_resume(tmp_path, trainer):
    overrides = [re.sub(r"^trainer=ddp$", f"trainer={trainer}", o) for o in _srun_overrides()]
    cfg = compose_config("train_lvlm", tmp_path, overrides)
    assert cfg.ckpt_path == "auto" and cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8
    assert cfg.data.num_workers == 7
    assert "--requeue" in SBATCH.read_text() and "SIGUSR1" in SBATCH.read_text()
