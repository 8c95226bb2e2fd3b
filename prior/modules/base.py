"""What the training modules share: exact token-mean loss normalisation and optimizers from config.

Token-mean normalisation: the loss of an optimizer step is the sum of per-token losses over every
micro-batch of the accumulation window and every DDP rank, divided by the number of loss tokens in
all of them. A mean of per-batch means is wrong when token counts differ (long and short captions),
so each micro-batch backpropagates its loss *sum* and ``on_before_optimizer_step`` divides the
accumulated gradients by the token count all-reduced over ranks, before gradient clipping.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from prior.config import to_plain

# The modules move batches themselves (transfer_batch_to_device below); Lightning says so on every run.
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")
from prior.strategies import is_sharded


class TokenLossModule(L.LightningModule):
    """Base class: ``token_sum_backward_value`` + exact gradient normalisation + optimizers."""

    def __init__(self) -> None:
        super().__init__()
        # A Python number until the first micro-batch: ddp_spawn pickles the module into every
        # process, and a tensor attribute would travel as shared memory, one counter for all
        # ranks. From then on a tensor on the step's device, so counting never waits for the GPU.
        self._window_tokens: torch.Tensor | float = 0.0
        self.last_loss: torch.Tensor | None = None

    def token_sum_objective(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """What ``training_step`` returns for a micro-batch whose per-token losses sum to
        ``loss_sum`` over ``num_tokens`` loss tokens; gradients are normalised at the step."""
        self._window_tokens = self._window_tokens + num_tokens.detach().to(torch.float64)
        self.last_loss = loss_sum.detach() / num_tokens.clamp(min=1)  # named by NonFiniteGuard
        # Lightning divides by accumulate_grad_batches and DDP averages over ranks: undo both.
        return loss_sum * (self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def setup(self, stage: str) -> None:
        """Trained parameters loaded in bf16/fp16 (``llm.dtype``) get fp32 master weights, so the
        optimizer never accumulates updates in 8 mantissa bits; bf16-mixed still computes in bf16,
        and frozen parameters keep their low precision (the memory saving). A ``*-true`` precision
        casts everything back when the strategy sets the model up."""
        for p in self.parameters():
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        tokens = torch.as_tensor(self._window_tokens, dtype=torch.float64, device=self.device)
        tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = 1.0 / tokens.clamp(min=1.0)  # stays on the device: no host sync in the step
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self._window_tokens = 0.0

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move a batch dict's tensors and nothing else. Lightning's default walks every nested
        object, and the per-sample ``meta`` (parsed json), keys and captions make that walk cost
        more than a small model's step."""
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` under every strategy: FSDP shards the gradients, so the norm
        is FSDP's own (all ranks' shards together; Lightning's norm clipping refuses FSDP)."""
        if gradient_clip_val and is_sharded(self.trainer.strategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r} under FSDP: use 'norm'.")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        """AdamW-style optimizer and optional step-wise scheduler from ``hparams``.

        Biases and norm weights (1-d parameters) get no weight decay.
        """
        opt_cfg = dict(to_plain(self.hparams.optimizer))
        decay = opt_cfg.pop("weight_decay", 0.0)
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("No trainable parameters: check the freezing config (`train:`).")
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = instantiate(opt_cfg, _partial_=True)([g for g in groups if g["params"]])
        sched_cfg = to_plain(self.hparams.get("scheduler"))
        if not sched_cfg:
            return optimizer
        sched_cfg = dict(sched_cfg)
        if sched_cfg.get("num_training_steps") is None and "num_training_steps" in sched_cfg:
            sched_cfg["num_training_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = instantiate(sched_cfg, _partial_=True)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
