from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from prior.cli.train_lvlm import train_lvlm
from prior.loggers import RUN_ID_FILE
from tests.test_lvlm_training import FAST, first_batch, lvlm_cfg

WANDB_VARS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_MODE", "WANDB_API_KEY")


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_wandb_offline_by_default_inside_the_run_folder_and_resume_continues_the_run(demo, tmp_path, monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in FAST if o != "logger=csv"]
    run1 = tmp_path / "run1"
    cfg = lvlm_cfg(demo, "logger=wandb", "trainer.max_steps=2", "checkpoint_every=2", "trainer.val_check_interval=2",
                   "callbacks.sample_table.every_n_steps=1", "callbacks.weight_histogram.every_n_steps=1",
                   "trainer.log_every_n_steps=1",
                   f"paths.output_dir={run1}", f"export_dir={tmp_path / 'e1'}", *overrides)
    metrics = train_lvlm(cfg)
    assert "throughput/samples_per_s" in metrics and metrics["throughput/tokens_per_s"] > 0
    # FLOPs counted at step 1 give the achieved TFLOP/s; no MFU without a known peak (a CPU)
    assert metrics["throughput/tflops"] > 0 and "throughput/mfu" not in metrics
    offline = list((run1 / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run_id = (run1 / RUN_ID_FILE).read_text().strip()
    assert offline[0].name.endswith(run_id)
    assert not files_under(home), files_under(home)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("home", "run1", "e1")]
    # the offline run holds the sample table and the weight histogram
    history = next(offline[0].glob("*.wandb")).read_bytes()
    assert b"samples" in history and b"weights/histogram" in history

    run2 = tmp_path / "run2"
    resumed = lvlm_cfg(demo, "logger=wandb", "trainer.max_steps=4", "checkpoint_every=2", "trainer.val_check_interval=2",
                       f"paths.output_dir={run2}", f"export_dir={tmp_path / 'e2'}",
                       f"ckpt_path={run1 / 'checkpoints' / 'last.ckpt'}", *overrides)
    train_lvlm(resumed)
    assert (run2 / RUN_ID_FILE).read_text().strip() == run_id
    assert any(p.name.endswith(run_id) for p in (run2 / "wandb").glob("offline-run-*"))


def test_throughput_counts_the_flops_of_one_training_step(demo, monkeypatch):
    """The FLOPs per sample that Throughput turns into TFLOP/s (and MFU) are those of the whole
    step between its hooks: forward, loss and backward, as counted around the same step."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from prior.callbacks import Throughput, peak_flops

    cfg = lvlm_cfg(demo, "loss=prior")
    _, batch = first_batch(cfg)
    model = instantiate(cfg.model, _recursive_=False)
    with FlopCounterMode(display=False) as counter:
        model._losses(batch)["objective_sum"].backward()
    callback = Throughput(count_flops_at=3)
    trainer = SimpleNamespace(global_step=3, log_every_n_steps=1)
    callback.on_train_batch_start(trainer, model, batch, 0)
    model._losses(batch)["objective_sum"].backward()
    callback.on_train_batch_end(trainer, model, None, batch, 0)
    assert callback.flops_per_sample == counter.get_total_flops() / batch["input_ids"].shape[0] > 0
    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None
    # a FLOP formula that fails (an older torch on grouped-query attention) never stops training
    from torch.utils import flop_counter

    def fails(*args, **kwargs):
        raise AssertionError("shapes are incompatible")

    monkeypatch.setitem(flop_counter.flop_registry, torch.ops.aten.mm, fails)
    callback = Throughput(count_flops_at=3)
    callback.on_train_batch_start(trainer, model, batch, 0)
    model._losses(batch)["objective_sum"].backward()
    callback.on_train_batch_end(trainer, model, None, batch, 0)
    assert callback.flops_per_sample is None


def test_the_runs_of_one_sweep_share_a_wandb_group():
    """${sweep_group:} (the wandb logger's group) names the sweep in a multirun, nothing otherwise."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from prior.cli._hydra import CONF_DIR
    from prior.config import sweep_group

    assert sweep_group() is None  # outside a Hydra run
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train_lvlm", ["paths.root_dir=/r"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.name = "train_lvlm"
        cfg.hydra.sweep.dir = "/r/logs/train_lvlm/multiruns/2026-11-26_22-55-00"
    runs = {mode: cfg.copy() for mode in (RunMode.RUN, RunMode.MULTIRUN)}
    try:
        for mode, run in runs.items():
            with open_dict(run):
                run.hydra.mode = mode
            HydraConfig.instance().set_config(run)
            expected = "train_lvlm/2026-11-26_22-55-00" if mode == RunMode.MULTIRUN else None
            assert sweep_group() == run.logger.wandb.group == expected
    finally:
        HydraConfig.instance().cfg = None
