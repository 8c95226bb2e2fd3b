from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import prior
from prior.cli.common import build_datamodule
from prior.cli.train_lvlm import train_lvlm
from prior.modules.base import TokenLossModule
from tests.conftest import TINY_LLM, compose_config

# Tiny stage-3 runs on the session's demo corpus (see conftest.demo).
FAST = [*TINY_LLM, "data.batch_size=16", "data.eval_batch_size=64", "trainer.limit_val_batches=1",
        "logger=csv", "scheduler.num_warmup_steps=2"]


def lvlm_cfg(demo, *overrides: str, backbone: str = "encoder_free"):
    return compose_config("train_lvlm", demo.root, [f"backbone={backbone}", *FAST, *overrides])


def first_batch(cfg):
    dm = build_datamodule(cfg)
    return dm, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("backbone", ["encoder_free", "visual_encoder"])
def test_prior_with_equal_weights_is_exactly_ntp(demo, backbone):
    cfg = lvlm_cfg(demo, "loss=prior", backbone=backbone)
    _, batch = first_batch(cfg)
    model = instantiate(cfg.model, _recursive_=False)
    batch["ref_logprobs"] = torch.full_like(batch["ref_logprobs"], math.log(0.5))  # w = 0.5 exactly
    r = model._losses(batch)
    grads = torch.autograd.grad(r["objective_sum"], list(model.model.llm.parameters()))
    ntp_model = instantiate(lvlm_cfg(demo, "loss=ntp", backbone=backbone).model, _recursive_=False)
    ntp_model.load_state_dict(model.state_dict())
    ntp = ntp_model._losses(batch)
    ntp_grads = torch.autograd.grad(ntp["objective_sum"], list(ntp_model.model.llm.parameters()))
    assert torch.allclose(r["objective_sum"], ntp["objective_sum"], rtol=1e-6)
    for g, h in zip(grads, ntp_grads, strict=True):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-7)


def test_prior_weights_change_the_loss_and_image_tokens_carry_none(demo):
    cfg = lvlm_cfg(demo, "loss=prior")
    _, batch = first_batch(cfg)
    model = instantiate(cfg.model, _recursive_=False)
    r = model._losses(batch)
    assert not torch.allclose(r["objective_sum"], r["ntp_sum"])
    assert r["mask"].shape == batch["input_ids"][:, 1:].shape  # caption tokens only
    assert r["tokens"] == batch["attention_mask"][:, 1:].sum()


def test_online_weights_equal_sidecar_weights(demo):
    cfg = lvlm_cfg(demo, "loss=prior")
    _, batch = first_batch(cfg)
    online = instantiate(lvlm_cfg(demo, "loss=prior_online").model, _recursive_=False)
    scored = online.ref_logprobs(batch)
    mask = batch["attention_mask"][:, 1:]
    assert torch.allclose(scored[mask], batch["ref_logprobs"][mask], atol=1e-5)
    assert online._reference and not any(k.startswith("_reference") for k in online.state_dict())


def test_multirun_over_losses_and_backbones(demo):
    """Every weighting scheme trains on both backbones from its config (one process, 14 runs)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    losses = sorted(p.stem for p in (Path(prior.__file__).parents[1] / "conf" / "loss").glob("*.yaml"))
    assert len(losses) == 7
    cmd = [
        sys.executable, "-m", "prior.cli.train_lvlm", "-m",
        f"loss={','.join(losses)}", "backbone=visual_encoder,encoder_free",
        f"paths.root_dir={demo.root}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "checkpoint_every=2", *FAST,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=demo.root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("LVLM exported to") == 2 * len(losses)
    exports = sorted((demo.root / "logs" / "train_lvlm" / "multiruns").glob("*/*/export/prior_lvlm.json"))
    assert len(exports) == 2 * len(losses)
    trained = {OmegaConf.load(e.parents[1] / ".hydra" / "config.yaml").loss.name for e in exports}
    assert trained == set(losses)


@pytest.mark.parametrize("experiment,tokens", [("paper_h_lvlm", 576), ("paper_u_lvlm", 16 * 17)])
def test_paper_presets_compose_and_fit_on_meta(demo, experiment, tokens):
    from prior.models.lvlm import build_lvlm

    cfg = compose_config("train_lvlm", demo.root, [f"experiment={experiment}", "data.shards.train=x"])
    assert cfg.model.backbone.name in ("visual_encoder", "encoder_free")
    assert cfg.data.tokenizer == cfg.llm.name_or_path
    llm = {**cfg.llm, "name_or_path": None}
    backbone = {**cfg.backbone, "pretrained": False} if "pretrained" in cfg.backbone else cfg.backbone
    with torch.device("meta"):
        lvlm = build_lvlm(backbone, llm, tokenizer=None)
        size = cfg.data.image_size
        embeds, mask = lvlm.backbone(torch.zeros(1, 3, size, size), None)
    hidden = lvlm.llm.config.hidden_size
    assert embeds.shape == (1, tokens, hidden) and mask.shape == (1, tokens)
    assert lvlm.llm.get_input_embeddings().weight.shape[0] == cfg.llm.config.vocab_size


def test_train_export_load_generate_same_logits(demo, tmp_path):
    cfg = lvlm_cfg(demo, "loss=prior", "trainer.max_steps=3", "trainer.val_check_interval=3",
                   f"export_dir={tmp_path / 'export'}", f"paths.output_dir={tmp_path / 'run'}")
    metrics = train_lvlm(cfg)
    assert {"train/loss", "train/ntp_loss", "val/ntp_loss", "weights/weight_mean"} <= set(metrics)
    _, batch = first_batch(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    from prior.modules.lvlm import LVLMModule

    restored = LVLMModule.load_from_checkpoint(ckpt).eval()
    loaded, tokenizer = prior.load(tmp_path / "export")
    args = (batch["images"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        a = restored.model(*args).logits
        b = loaded(*args).logits
    assert torch.allclose(a, b, atol=1e-5)
    gen_a = restored.model.generate(batch["images"][:2], max_new_tokens=5)
    gen_b = loaded.generate(batch["images"][:2], max_new_tokens=5)
    assert gen_a == gen_b and all(len(g) <= 5 for g in gen_a)
    assert isinstance(tokenizer.decode(gen_b[0]), str)


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(demo, tmp_path):
    """SIGKILL a training subprocess after its step-2 checkpoint; ``ckpt_path=last`` in the same run
    folder restores model, optimizer, scheduler, RNG and data position: the final weights equal an
    uninterrupted run's."""
    common = ["loss=prior", "trainer.max_steps=5", "trainer.val_check_interval=1000", "checkpoint_every=2",
              "trainer.limit_val_batches=0", "scheduler.num_warmup_steps=2", "~callbacks.sample_table"]
    train_lvlm(lvlm_cfg(demo, *common, f"paths.output_dir={tmp_path / 'full'}", f"export_dir={tmp_path / 'a'}"))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prior.cli.train_lvlm", "backbone=encoder_free", *FAST, *common,
           f"paths.root_dir={demo.root}", f"hydra.run.dir={run}", f"export_dir={tmp_path / 'b'}",
           "+callbacks.pause._target_=tests.helpers.PauseAt", "+callbacks.pause.step=2"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step000002.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # last.ckpt is written right after
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "b").exists()
    train_lvlm(lvlm_cfg(demo, *common, f"paths.output_dir={run}", f"export_dir={tmp_path / 'b'}", "ckpt_path=last"))
    a, _ = prior.load(tmp_path / "a")
    b, _ = prior.load(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_ckpt_path_last_auto_and_remote(tmp_path):
    from prior.cli.common import resolve_ckpt_path

    with pytest.raises(FileNotFoundError, match=r"last.ckpt does not exist.*hydra.run.dir"):
        resolve_ckpt_path("last", tmp_path)
    assert resolve_ckpt_path("auto", tmp_path) is None  # a requeued job that never checkpointed
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    os.utime(hpc, (time.time() + 10, time.time() + 10))
    assert resolve_ckpt_path("auto", tmp_path) == str(hpc)  # written on SIGUSR1 before a requeue
    with pytest.raises(ValueError, match="allow_remote_ckpt=true"):
        resolve_ckpt_path("https://example.invalid/last.ckpt", tmp_path)
    assert resolve_ckpt_path("s3://bucket/x.ckpt", tmp_path, allow_remote=True) == "s3://bucket/x.ckpt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
    # FSDP's sharded checkpoints are folders named like files
    sharded = tmp_path / "sharded" / "checkpoints" / "last.ckpt"
    sharded.mkdir(parents=True)
    assert resolve_ckpt_path("last", tmp_path / "sharded") == str(sharded)
    assert resolve_ckpt_path(str(sharded), tmp_path) == str(sharded)


class _Linear(TokenLossModule):
    """y = x @ w; per-token squared error as a stand-in for per-token cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"optimizer": {"_target_": "torch.optim.SGD", "lr": 1.0}, "scheduler": None})
        self.w = torch.nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        x, mask = batch
        per_token = ((x * self.w).sum(-1) - 1.0) ** 2
        return self.token_sum_objective((per_token * mask).sum(), mask.sum())


def test_gradient_is_the_token_mean_over_the_accumulation_window():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    masks = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)  # 5 and 1 tokens
    batches = [(x[i : i + 1], masks[i : i + 1]) for i in range(2)]
    model = _Linear()
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    w = torch.ones(3, requires_grad=True)
    per_token = ((x * w).sum(-1) - 1.0) ** 2
    ((per_token * masks).sum() / masks.sum()).backward()
    assert torch.allclose(model.w.detach(), torch.ones(3) - w.grad, atol=1e-6)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    from prior.callbacks import RNGState

    cb = RNGState()
    torch.save(cb.state_dict(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    cb.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_two_process_ddp_on_cpu_trains_and_exports(demo, tmp_path):
    """The distributed path (gloo, ddp_spawn): shards split over ranks, equal batches, no hang."""
    cfg = lvlm_cfg(demo, "loss=prior", "trainer=ddp_cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "checkpoint_every=2", f"paths.output_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}")
    metrics = train_lvlm(cfg)
    assert metrics["train/loss"] > 0 and "val/ntp_loss" in metrics
    loaded, _ = prior.load(tmp_path / "export")
    assert sum(p.numel() for p in loaded.parameters()) > 0


def test_checkpoints_can_hold_only_the_trainable_parameters(demo, tmp_path):
    cfg = lvlm_cfg(demo, "loss=ntp", "backbone.train=[projector]", "model.save_frozen=false",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint_every=2",
                   f"paths.output_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}")
    train_lvlm(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    saved = {k for k in ckpt["state_dict"] if k.startswith("model.")}
    assert saved and all(k.startswith("model.backbone.projector") for k in saved)
    from prior.modules.lvlm import LVLMModule

    restored = LVLMModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    for name in saved:
        assert torch.equal(restored.state_dict()[name], ckpt["state_dict"][name])


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_non_finite_training_stops_and_keeps_the_last_finite_checkpoint_and_export(demo, tmp_path, action):
    """optimizer.lr=1e30 trains into NaN: the run raises naming the step (after max_skips skipped
    steps with action=skip); last.ckpt holds the last finite state; the previous export survives."""
    from prior.callbacks import NonFiniteError, non_finite_tensors

    export = tmp_path / "export"
    export.mkdir()
    (export / "previous.txt").write_text("the previous export")
    cfg = lvlm_cfg(demo, "loss=ntp", "optimizer.lr=1e30", "trainer.max_steps=8", "trainer.val_check_interval=8",
                   "checkpoint_every=1", f"callbacks.nonfinite_guard.action={action}",
                   "callbacks.nonfinite_guard.max_skips=2", f"paths.output_dir={tmp_path / 'run'}",
                   f"export_dir={export}")
    pattern = r"non-finite gradient norm .* at step \d+" + (r".*after 2 skipped step" if action == "skip" else "")
    with pytest.raises(NonFiniteError, match=pattern):
        train_lvlm(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not non_finite_tensors(last["state_dict"])
    assert last["global_step"] >= 1
    assert sorted(p.name for p in export.iterdir()) == ["previous.txt"]


def test_non_finite_checkpoints_and_exports_are_refused(demo, tmp_path):
    from prior.callbacks import NonFiniteError, NonFiniteGuard
    from prior.cli.common import export_atomically

    model = instantiate(lvlm_cfg(demo, "loss=ntp").model, _recursive_=False)
    export_atomically(model, tmp_path / "export")
    first = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert first  # written through a temporary folder, swapped in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="Refusing to export"):
        export_atomically(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == first
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    with pytest.raises(NonFiniteError, match="Refusing to checkpoint step 0"):
        NonFiniteGuard().on_save_checkpoint(trainer, model, {"state_dict": model.state_dict()})


class _ShardedStub:
    """An FSDPStrategy as far as the callbacks and the module can tell, on one CPU process, whose
    other (imagined) ranks report ``others`` to a sum all-reduce."""

    def __new__(cls, others: float = 0.0, model=None):  # noqa: ANN204
        from lightning.pytorch.strategies import FSDPStrategy

        class Stub(FSDPStrategy):
            def reduce(self, tensor, group=None, reduce_op="mean"):  # noqa: ANN001, ANN202
                assert reduce_op == "sum"
                return tensor + others

        strategy = Stub()
        strategy._model = model
        return strategy


def test_under_fsdp_every_rank_stops_when_one_shard_of_the_gradients_is_not_finite():
    """Under FSDP each rank holds a shard of the gradients; a non-finite shard on another rank stops
    this one too (otherwise the ranks part ways and hang), and a finite step passes."""
    from types import SimpleNamespace

    from prior.callbacks import NonFiniteError, NonFiniteGuard

    module = _Linear()
    module.w.grad = torch.ones(3)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    NonFiniteGuard().on_before_optimizer_step(SimpleNamespace(strategy=_ShardedStub(0.0), global_step=3),
                                             module, optimizer)
    with pytest.raises(NonFiniteError, match="at step 3"):
        NonFiniteGuard().on_before_optimizer_step(SimpleNamespace(strategy=_ShardedStub(1.0), global_step=3),
                                                 module, optimizer)
    with pytest.raises(NonFiniteError, match="Refusing to checkpoint step 3.*another rank"):
        NonFiniteGuard().on_save_checkpoint(SimpleNamespace(strategy=_ShardedStub(1.0), global_step=3), module,
                                            {"state_dict": module.state_dict()})


def test_under_fsdp_gradient_clipping_uses_the_sharded_norm():
    """Lightning refuses norm clipping under FSDP; the modules clip with FSDP's own
    clip_grad_norm_ (which all-reduces the shards' norms) at trainer.gradient_clip_val."""
    from types import SimpleNamespace

    calls = []
    wrapped = SimpleNamespace(clip_grad_norm_=lambda max_norm: calls.append(max_norm))
    module = _Linear()
    from lightning.pytorch.plugins.precision import Precision

    module._trainer = SimpleNamespace(strategy=_ShardedStub(model=wrapped), gradient_clip_val=None,
                                      gradient_clip_algorithm=None, precision_plugin=Precision())
    module.configure_gradient_clipping(torch.optim.SGD(module.parameters(), lr=1.0), 1.0, "norm")
    assert calls == [1.0]
    module.configure_gradient_clipping(torch.optim.SGD(module.parameters(), lr=1.0), None, None)
    assert calls == [1.0]  # clipping off
    with pytest.raises(ValueError, match="use 'norm'"):
        module.configure_gradient_clipping(torch.optim.SGD(module.parameters(), lr=1.0), 1.0, "value")


def test_checkpoint_retention_is_bounded_by_default(tmp_path):
    """The default callbacks keep the newest 3 periodic checkpoints beside last.ckpt."""
    cfg = compose_config("train_lvlm", tmp_path, ["checkpoint_every=1"])
    checkpoint = instantiate(cfg.callbacks.model_checkpoint)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def training_step(self, batch, batch_idx):
            return (self.w * batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.ones(8, 2), batch_size=1)
    L.Trainer(max_steps=7, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(Tiny(), loader)
    kept = sorted(p.name for p in Path(cfg.callbacks.model_checkpoint.dirpath).iterdir())
    assert kept == ["last.ckpt", "step000005.ckpt", "step000006.ckpt", "step000007.ckpt"]


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two right-padded [B, T, ...] tensors stacked into one batch padded to the longer T."""
    if a.ndim < 2 or a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    t = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))  # noqa: E731
    return torch.cat([pad(a), pad(b)])


def test_ddp_ranks_read_disjoint_data_and_match_one_process_with_twice_the_batch(demo, tmp_path):
    """2 gloo ranks x 2 workers x batch 8: disjoint samples on every step, and the first step's
    normalised gradients equal one process's over the union batch of 16 (per-caption PRIOR)."""
    out = tmp_path / "rec"
    out.mkdir()
    cfg = lvlm_cfg(demo, "loss=prior", "trainer=ddp_cpu", "trainer.max_steps=3", "trainer.val_check_interval=1000",
                   "trainer.limit_val_batches=0", "trainer.gradient_clip_val=null", "data.batch_size=8",
                   "data.num_workers=2", "~callbacks.sample_table", f"paths.output_dir={tmp_path / 'run'}",
                   f"export_dir={tmp_path / 'export'}", "+callbacks.record._target_=tests.helpers.RecordSteps",
                   f"+callbacks.record.out={out}")
    train_lvlm(cfg)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    seen0, seen1 = ({k for step in r["keys"] for k in step} for r in (r0, r1))
    assert len(r0["keys"]) == len(r1["keys"]) == 3 and len(seen0) == len(seen1) == 24
    assert not seen0 & seen1
    model = instantiate(cfg.model, _recursive_=False)
    model.load_state_dict(r0["initial"])
    batch = {k: _pad_cat(r0["batch"][k], r1["batch"][k]) for k in r0["batch"]}
    r = model._losses(batch)
    r["objective_sum"].backward()
    for name, p in model.named_parameters():
        if name in r0["grads"]:
            single = p.grad / r["tokens"]
            assert torch.allclose(r0["grads"][name], single, rtol=1e-4, atol=1e-7), name
            assert torch.equal(r0["grads"][name], r1["grads"][name]), name


def test_a_failing_rank_brings_the_job_down_with_its_error(demo, tmp_path):
    cfg = lvlm_cfg(demo, "loss=ntp", "trainer=ddp_cpu", "trainer.max_steps=3", "trainer.limit_val_batches=0",
                   f"paths.output_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}",
                   "+callbacks.fail._target_=tests.helpers.FailOnRank", "+callbacks.fail.rank=1")
    start = time.time()
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        train_lvlm(cfg)
    assert time.time() - start < 120  # not the process group's 30-minute timeout
    assert not (tmp_path / "export").exists()


def test_a_failing_rank_under_the_subprocess_ddp_launcher_ends_the_job_with_its_error(demo, tmp_path):
    """``strategy=ddp`` as on a cluster: Lightning re-runs the command line for rank 1, which raises
    at its first step; the whole job (a subprocess here) exits non-zero within seconds, with rank
    1's error, instead of rank 0 waiting out the process group's timeout."""
    cmd = [sys.executable, "-m", "prior.cli.train_lvlm", "backbone=encoder_free", *FAST, "loss=ntp",
           "trainer=ddp_cpu", "trainer.strategy=ddp", "trainer.max_steps=3", "trainer.limit_val_batches=0",
           f"paths.root_dir={demo.root}", f"hydra.run.dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'export'}",
           "+callbacks.fail._target_=tests.helpers.FailOnRank", "+callbacks.fail.rank=1"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched
        output, _ = proc.communicate()
        pytest.fail(f"the job outlived its failing rank:\n{output[-3000:]}")
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in output, output[-3000:]
    assert time.time() - start < 120, output[-3000:]
    assert not (tmp_path / "export").exists()


def test_trained_bf16_parameters_get_fp32_master_weights(demo):
    cfg = lvlm_cfg(demo, "loss=ntp", "llm.dtype=bfloat16", "backbone.train=[projector,llm]")
    model = instantiate(cfg.model, _recursive_=False)
    llm = dict(model.model.llm.named_parameters())
    assert {p.dtype for p in llm.values()} == {torch.bfloat16}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    model.setup("fit")
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_fsdp_policy_wraps_decoder_layers_and_vit_blocks(demo):
    from prior.strategies import layer_policy

    cfg = compose_config("train_lvlm", demo.root, ["trainer=fsdp", "backbone=visual_encoder", *FAST[:2]])
    assert cfg.trainer.strategy._target_ == "prior.strategies.fsdp_strategy"
    model = instantiate(lvlm_cfg(demo, "loss=ntp", backbone="visual_encoder").model, _recursive_=False)
    policy = layer_policy(cfg.trainer.strategy.wrap_layers)
    wrapped = {type(m).__name__ for m in model.modules() if policy(m, recurse=False, nonwrapped_numel=0)}
    assert wrapped == {"LlamaDecoderLayer", "Block"}
    assert policy(model, recurse=True, nonwrapped_numel=0)
    import pickle

    assert pickle.loads(pickle.dumps(policy))(model.model.llm.model.layers[0], recurse=False, nonwrapped_numel=0)


def test_debug_presets_run_one_batch_and_overfit_one(demo, tmp_path, capsys):
    """debug=fdr runs one training batch (and exports); debug=profiler writes the hooks' times;
    debug=overfit drives one batch's loss down; a run starts by printing its composed config."""
    import csv

    metrics = train_lvlm(lvlm_cfg(demo, "loss=prior", "debug=fdr", f"paths.output_dir={tmp_path / 'fdr'}",
                                  f"export_dir={tmp_path / 'fdr_export'}"))
    assert "train/loss" in metrics and (tmp_path / "fdr_export" / "model.safetensors").exists()
    assert "fast_dev_run: true" in capsys.readouterr().out
    train_lvlm(lvlm_cfg(demo, "loss=prior", "debug=profiler", "trainer.max_steps=2",
                        f"paths.output_dir={tmp_path / 'profile'}", f"export_dir={tmp_path / 'profile_export'}"))
    assert "run_training_batch" in (tmp_path / "profile" / "fit-profile.txt").read_text()
    train_lvlm(lvlm_cfg(demo, "loss=prior", "debug=overfit", "optimizer.lr=1e-2", "scheduler.num_warmup_steps=5",
                        "trainer.log_every_n_steps=1", f"paths.output_dir={tmp_path / 'overfit'}",
                        f"export_dir={tmp_path / 'overfit_export'}"))
    (metrics_csv,) = (tmp_path / "overfit" / "csv").glob("version_*/metrics.csv")
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics_csv.open()) if r.get("train/loss")]
    # the demo captions' own entropy keeps a normal run above 1.5: only one batch, seen 50 times, goes below
    assert len(losses) == 50 and min(losses[-5:]) < 1.0
