"""`hparams_search=...` (conf/hparams_search): Hydra's Optuna sweeper over the training stages.

The configs compose into an Optuna sweep whose search space names real keys and whose
``optimized_metric`` is one the stage's module logs; the entry points return that metric (the worst
value for a diverged trial, an error when it was never logged); and a real two-trial search of
``prior-train-lvlm`` samples two settings, groups its runs as one sweep and writes the best trial.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from prior.cli._hydra import CONF_DIR
from tests.conftest import TINY_LLM

#: entry point's root config, its search, the metric the search minimises
SEARCHES = [("train_lvlm", "lvlm_optuna", "val/ntp_loss"), ("train_ref", "ref_optuna", "val/loss"),
            ("train_base", "ref_optuna", "val/loss")]


def _compose(config: str, overrides: list[str]):  # noqa: ANN202
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(config, ["paths.root_dir=/r", *overrides], return_hydra_config=True)


def _a_value(sweep: str) -> str:
    """One value a trial may get from a sweep expression: a choice's first, an interval's midpoint."""
    override = OverridesParser.create().parse_overrides([f"k={sweep}"])[0]
    assert override.is_sweep_override(), sweep
    if override.is_interval_sweep():
        value = override.value()
        return str((value.start + value.end) / 2)
    return next(iter(override.sweep_string_iterator()))


@pytest.mark.parametrize("config,search,metric", SEARCHES)
def test_each_search_composes_into_an_optuna_sweep_over_real_keys(config, search, metric):
    plain = _compose(config, [])
    assert "optimized_metric" not in plain and "BasicSweeper" in plain.hydra.sweeper._target_

    cfg = _compose(config, [f"hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert str(sweeper.direction).endswith("minimize") and sweeper.storage is None and sweeper.n_jobs == 1
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.optimized_metric == metric
    assert "optimizer.lr" in sweeper.params and "log" in sweeper.params["optimizer.lr"]
    # the metric is one the stage's module logs
    module = importlib.util.find_spec(cfg.model._target_.rsplit(".", 1)[0]).origin
    assert f'self.log("{metric}"' in Path(module).read_text()
    # every searched key exists, and a trial's overrides compose and land where they should
    trial = {key: _a_value(sweep) for key, sweep in sweeper.params.items()}
    assert all(OmegaConf.select(plain, key) is not None for key in trial), trial
    sampled = _compose(config, [f"hparams_search={search}", *(f"{k}={v}" for k, v in trial.items())])
    for key, value in trial.items():
        assert str(OmegaConf.select(sampled, key)) == value


def test_the_value_returned_to_the_sweeper():
    """Outside a search: the stage's metric or None. In one: ``optimized_metric``, the worst value
    for a diverged trial (NaN, or a NonFiniteError), and an error naming the fix when never logged."""
    from hydra.core.hydra_config import HydraConfig

    from prior.callbacks import NonFiniteError
    from prior.cli.objective import objective, train_trial

    plain = _compose("train_lvlm", [])
    assert objective({"val/ntp_loss": 2.5, "val/loss": 3.0}, plain, default="val/ntp_loss") == 2.5
    assert objective({}, plain, default="val/ntp_loss") is None

    search = _compose("train_lvlm", ["hparams_search=lvlm_optuna"])
    assert objective({"val/ntp_loss": 2.5, "val/loss": 3.0}, search, default="val/loss") == 2.5
    other = _compose("train_lvlm", ["hparams_search=lvlm_optuna", "optimized_metric=val/loss"])
    assert objective({"val/ntp_loss": 2.5, "val/loss": 3.0}, other, default="val/ntp_loss") == 3.0
    assert objective({"val/ntp_loss": float("nan")}, search, default="val/ntp_loss") == math.inf
    with pytest.raises(ValueError, match=r"never logged \(logged: train/loss\).*val_check_interval"):
        objective({"train/loss": 1.0}, search, default="val/ntp_loss")

    def diverges(cfg):  # noqa: ANN001, ANN202
        raise NonFiniteError("non-finite gradient norm (nan) at step 1")

    assert train_trial(diverges, search) == {"val/ntp_loss": math.inf}
    with pytest.raises(NonFiniteError):  # a plain run still stops with the error
        train_trial(diverges, plain)

    maximising = _compose("train_lvlm", ["hparams_search=lvlm_optuna", "hydra.sweeper.direction=maximize"])
    try:
        HydraConfig.instance().set_config(maximising)
        assert objective({"val/ntp_loss": math.inf}, maximising, default="val/ntp_loss") == -math.inf
        assert train_trial(diverges, maximising) == {"val/ntp_loss": -math.inf}
    finally:
        HydraConfig.instance().cfg = None


def test_a_two_trial_optuna_search_of_prior_train_lvlm(demo, tmp_path):
    """`prior-train-lvlm -m hparams_search=lvlm_optuna` on the tiny demo, two trials: each samples
    its own learning rate and PRIOR knobs, both runs share the sweep's group (``${sweep_group:}``,
    here the CSV logger's name), and optimization_results.yaml holds the trial with the lower
    val/ntp_loss, the value the entry point returned."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "prior.cli.train_lvlm", "-m", "hparams_search=lvlm_optuna",
           "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", f"paths.root_dir={demo.root}",
           *TINY_LLM, "data.batch_size=16", "data.eval_batch_size=64", "trainer.limit_val_batches=1",
           "scheduler.num_warmup_steps=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "checkpoint_every=2", "print_config=false", "~callbacks.sample_table", "logger=csv",
           "logger.csv.name=${sweep_group:}"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=demo.root)
    assert done.returncode == 0, done.stderr[-3000:]

    searched = {"optimizer.lr", "optimizer.weight_decay", "loss.alpha", "loss.floor"}
    trials = []
    for n in (0, 1):
        run = sweep / str(n)
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        params = {k: float(overrides[k]) for k in searched}
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert config.optimizer.lr == params["optimizer.lr"] and config.loss.floor == params["loss.floor"]
        assert 1e-4 <= params["optimizer.lr"] <= 1e-2 and params["loss.floor"] in (0.0, 0.05, 0.1, 0.2)
        with open(run / "train_lvlm" / "sweep" / "version_0" / "metrics.csv") as f:  # the sweep's group
            logged = [float(r["val/ntp_loss"]) for r in csv.DictReader(f) if r.get("val/ntp_loss")]
        trials.append((logged[-1], params))
    assert trials[0][1]["optimizer.lr"] != trials[1][1]["optimizer.lr"]
    assert trials[0][1]["loss.alpha"] != trials[1][1]["loss.alpha"]

    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    best_value, best_params = min(trials, key=lambda t: t[0])
    assert results["name"] == "optuna" and set(results["best_params"]) == searched
    assert results["best_value"] == pytest.approx(best_value, rel=1e-5)
    assert results["best_params"] == pytest.approx(best_params)
