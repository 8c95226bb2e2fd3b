"""Callbacks shared by the stages."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from prior.data.pipeline import SKIP_REASONS
from prior.strategies import is_sharded, local_values, root_params_gathered

log = logging.getLogger(__name__)


class SkipReport(L.Callback):
    """Logs the data counters of the datamodule (``data/skipped_<reason>``, ``data/read``,
    ``data/caption_not_utf8``) and prints the run's data report when it ends, so skipped samples are
    never silent."""

    def _counts(self, trainer: L.Trainer) -> dict[str, int]:
        counter = getattr(trainer.datamodule, "counter", None)
        return {**counter.totals(), **counter.notes()} if counter is not None else {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            for reason, n in self._counts(trainer).items():
                name = f"data/skipped_{reason}" if reason in SKIP_REASONS else f"data/{reason}"
                pl_module.log(name, float(n), reduce_fx="sum", sync_dist=False)

    def _report(self, trainer: L.Trainer) -> None:
        counter = getattr(trainer.datamodule, "counter", None)
        if counter is None:
            return
        line = counter.report()
        if line:
            log.warning(line)
        print(line or f"{counter.summary()}.")

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


#: Dense bf16 peak FLOP/s of the accelerators ``Throughput`` knows, by a part of the device name.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for ``precision`` when known (bf16 on the GPUs of
    ``PEAK_BF16_FLOPS``), else None."""
    if device.type != "cuda" or "bf16" not in str(precision):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _tolerant_flop_counter() -> tuple[Any, list[str]]:
    """torch's FlopCounterMode whose formulas never raise into the training step (an older torch
    asserts on grouped-query attention, for one): a failing formula is recorded in the list."""
    from torch.utils.flop_counter import FlopCounterMode

    counter, failed = FlopCounterMode(display=False), []

    def tolerant(op: Any, formula: Any) -> Any:
        def count(*args: Any, **kwargs: Any) -> int:
            try:
                return formula(*args, **kwargs)
            except Exception:  # noqa: BLE001
                failed.append(str(op))
                return 0
        return count

    counter.flop_registry = {op: tolerant(op, f) for op, f in counter.flop_registry.items()}
    return counter, failed


class Throughput(L.Callback):
    """Logs training throughput, measured between batch ends (so data loading time counts):
    ``throughput/samples_per_s``, ``throughput/tokens_per_s`` (caption tokens), and from the FLOPs
    of one counted step (``torch.utils.flop_counter`` on the forward and backward of step
    ``count_flops_at``, per sample) ``throughput/tflops`` achieved per device and, where the
    device's peak is known (``peak_flops``, or bf16 on the GPUs of ``PEAK_BF16_FLOPS``),
    ``throughput/mfu``. Caption lengths vary, so FLOP figures are per-sample estimates."""

    def __init__(self, count_flops_at: int | None = 1, peak_flops: float | None = None) -> None:
        self.count_flops_at = count_flops_at
        self.peak = peak_flops
        self.flops_per_sample: float | None = None
        self._counter: Any = None
        self._failed: list[str] = []
        self._last: float | None = None
        self._samples = 0
        self._tokens: torch.Tensor | int = 0  # on the batch's device until logged: no sync per step
        self._seconds = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: D102
        if self.peak is None:
            self.peak = peak_flops(pl_module.device, trainer.precision)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self.flops_per_sample is None and trainer.global_step == self.count_flops_at:
            self._counter, self._failed = _tolerant_flop_counter()
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            if self._failed:
                log.warning("FLOPs not counted (torch's counter failed on %s): no throughput/tflops or mfu",
                            self._failed[0])
            else:
                self.flops_per_sample = self._counter.get_total_flops() / max(int(batch["input_ids"].shape[0]), 1)
            self._counter = None
        now = time.perf_counter()
        if self._last is not None:
            self._seconds += now - self._last
            self._samples += int(batch["input_ids"].shape[0])
            self._tokens = self._tokens + batch["attention_mask"].sum()
        self._last = now
        if self._seconds > 0 and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            samples_per_s = self._samples / self._seconds
            pl_module.log("throughput/samples_per_s", samples_per_s)
            pl_module.log("throughput/tokens_per_s", float(self._tokens) / self._seconds)
            if self.flops_per_sample:
                achieved = self.flops_per_sample * samples_per_s
                pl_module.log("throughput/tflops", achieved / 1e12)
                if self.peak:
                    pl_module.log("throughput/mfu", achieved / self.peak)
            self._samples, self._tokens, self._seconds = 0, 0, 0.0

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._last = None  # validation time is not training throughput


def _wandb(trainer: L.Trainer) -> Any | None:
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WeightHistogram(L.Callback):
    """Every ``every_n_steps``, a histogram of the token weights the loss used on the batch's loss
    tokens, before normalisation (wandb and tensorboard loggers; the module exposes them as
    ``last_weights``)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        values = getattr(pl_module, "last_weights", None)
        if values is None or not trainer.is_global_zero or trainer.global_step % self.every_n_steps:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_histogram("weights/histogram", values.float().cpu(), trainer.global_step)
        wb = _wandb(trainer)
        if wb is not None:
            import wandb

            wb.experiment.log(
                {"weights/histogram": wandb.Histogram(values.float().cpu().numpy()), "trainer/global_step": trainer.global_step}
            )


def wandb_image(image: torch.Tensor) -> Any:
    """A [3, H, W] image tensor in [0, 1] as a ``wandb.Image`` (sample tables)."""
    import wandb

    return wandb.Image(image.permute(1, 2, 0).float().clamp(0, 1).cpu().numpy())


def weighted_caption_html(tokenizer: Any, ids: list[int], weights: list[float]) -> str:
    """Caption tokens as HTML, each shaded by its weight in [0, 1] (darker = more weight)."""
    import html

    cells = [
        f'<span title="{w:.2f}" style="background: rgba(220,40,90,{w:.2f})">{html.escape(tokenizer.decode([t]))}</span>'
        for t, w in zip(ids, weights, strict=False)
    ]
    return f'<div style="font-family: sans-serif; white-space: pre-wrap">{"".join(cells)}</div>'


class SampleTable(L.Callback):
    """Every ``every_n_steps``, a wandb table of training images with their caption tokens shaded
    by the weight the loss gives them (``pl_module.token_weights``: the weighting scheme with its
    knobs; weights above 1, as CAL's, are scaled to the largest) and the model's greedy caption
    (skipped without a wandb logger or images)."""

    def __init__(self, every_n_steps: int = 200, num_samples: int = 8, max_new_tokens: int = 48) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step = trainer.global_step
        wb = _wandb(trainer)
        if wb is None or "images" not in batch or step % self.every_n_steps:
            return
        rows = self.collect(trainer, pl_module, batch)
        if rows is None:
            return
        import wandb

        table = wandb.Table(columns=["image", "caption (shaded by weight)", "generated"])
        for image, shaded, generated in rows:
            table.add_data(wandb_image(image), wandb.Html(shaded), generated)
        wb.experiment.log({"samples": table, "trainer/global_step": step})

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule,
                batch: dict[str, Any]) -> list[tuple[torch.Tensor, str, str]] | None:
        """``rows`` of rank 0's batch on rank 0 (None elsewhere). Under a sharded strategy every
        rank must call it: all join the forward passes, on rank 0's samples (greedy decoding of
        the same inputs stops at the same step everywhere). Runs in the trainer's precision."""
        if is_sharded(trainer.strategy):
            batch = trainer.strategy.broadcast(_head(batch, self.num_samples), src=0)
        elif not trainer.is_global_zero:
            return None
        with trainer.precision_plugin.forward_context(), root_params_gathered(trainer.strategy), torch.no_grad():
            rows = self.rows(pl_module, batch)
        return rows if trainer.is_global_zero else None

    def rows(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> list[tuple[torch.Tensor, str, str]]:
        """(image, caption HTML shaded by weight, greedy caption) for the first samples of a batch."""
        head = _head(batch, self.num_samples)
        mask = head.get("image_mask")
        was_training = pl_module.model.training
        pl_module.model.eval()
        generated = pl_module.model.generate(head["images"], max_new_tokens=self.max_new_tokens, image_mask=mask)
        raw = pl_module.token_weights(head)  # what the loss gives these tokens, before normalisation
        pl_module.model.train(was_training)
        weights = (raw / max(float(raw.max()), 1.0)).tolist() if raw is not None else None
        tok = pl_module.tokenizer
        rows = []
        for i in range(head["images"].shape[0]):
            length = int(head["attention_mask"][i].sum())
            ids = head["input_ids"][i, 1:length].tolist()
            shaded = weighted_caption_html(tok, ids, weights[i][: len(ids)] if weights else [0.0] * len(ids))
            rows.append((head["images"][i], shaded, tok.decode(generated[i])))
        return rows


class NonFiniteError(RuntimeError):
    """A loss, gradient or parameter became NaN or infinite."""


def _head(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a batch."""
    n = min(n, batch["images"].shape[0])
    return {k: v[:n] if hasattr(v, "__getitem__") else v for k, v in batch.items()}


def _all_ranks(trainer: L.Trainer, ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce)."""
    failed = torch.tensor(0.0 if ok else 1.0, device=device)
    return float(trainer.strategy.reduce(failed, reduce_op="sum")) == 0.0


def non_finite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity (of a
    sharded checkpoint's entries, the shards this rank holds)."""
    return [k for k, v in tensors.items() if isinstance(v, torch.Tensor)
            and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in local_values(v))]


class NonFiniteGuard(L.Callback):
    """Stops a run whose gradients (and so its loss) stop being finite, before the optimizer applies
    them; and never lets a non-finite model reach a checkpoint.

    ``action="stop"`` raises ``NonFiniteError`` naming the step. ``action="skip"`` drops the
    step's gradients (the optimizer leaves every parameter alone), counts it
    (``train/nonfinite_skips``) and stops after ``max_skips`` skipped steps. Under DDP the
    gradients are already all-reduced here, so every rank decides the same. Checkpoints whose
    parameters are not all finite are refused, so ``last.ckpt`` keeps the last finite state.
    """

    def __init__(self, action: str = "stop", max_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0

    def state_dict(self) -> dict:  # noqa: D102
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: D102
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = (torch.nn.utils.get_total_norm(grads) if grads  # one fused pass (foreach kernels where available)
                else torch.zeros((), device=pl_module.device))
        finite = bool(torch.isfinite(norm))
        if is_sharded(trainer.strategy):
            # each rank holds a shard of the gradients: all decide on whether any shard is non-finite
            finite = _all_ranks(trainer, finite, pl_module.device)
        if finite:
            return
        loss = getattr(pl_module, "last_loss", None)
        what = (f"non-finite gradient norm ({float(norm)}) at step {trainer.global_step}"
                + (f", loss {float(loss)}" if loss is not None else ""))
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            log.warning("skipped the optimizer step: %s (%d of at most %d)", what, self.skipped, self.max_skips)
            pl_module.log("train/nonfinite_skips", float(self.skipped), sync_dist=False)
            return
        hint = ("lower optimizer.lr, keep gradient clipping on (trainer.gradient_clip_val), check the data; "
                "or set callbacks.nonfinite_guard.action=skip to skip such steps")
        if self.action == "skip":
            what = f"{what}, after {self.skipped} skipped step(s) (max_skips={self.max_skips})"
        raise NonFiniteError(f"Training stopped: {what}. The last checkpoint is the last finite state; {hint}.")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: D102
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if is_sharded(trainer.strategy) and not _all_ranks(trainer, not bad, pl_module.device):
            bad = bad or ["a parameter shard on another rank"]
        if bad:
            raise NonFiniteError(
                f"Refusing to checkpoint step {trainer.global_step}: {len(bad)} parameter tensor(s) are not "
                f"finite (first: {bad[0]}); the previous checkpoint is kept."
            )
