"""Stage 1: the text-only reference LM, pre-trained with NTP on the captions alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric

from prior.data.tokenization import load_tokenizer
from prior.loss import prior_loss, token_cross_entropy
from prior.models.llm import build_llm
from prior.config import to_plain
from prior.modules.base import TokenLossModule


def caption_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, 1:] | prefix) under a causal LM, fp32, [B, L-1]; 0 where padded."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long()).logits[:, :-1]
    return -token_cross_entropy(logits, input_ids[:, 1:], attention_mask[:, 1:])


class ReferenceLM(TokenLossModule):
    """A Hugging Face causal LM trained on captions only; validation logs token perplexity."""

    def __init__(
        self,
        llm: dict[str, Any],
        tokenizer: str,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        llm, optimizer, scheduler = map(to_plain, (llm, optimizer, scheduler))
        self.save_hyperparameters()  # plain containers, so checkpoints load with weights_only
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = build_llm(self.tokenizer, **llm)
        self.val_nll = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, L-1, V] at the positions that predict ``input_ids[:, 1:]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask.long()).logits[:, :-1]

    def _nll_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"][:, 1:]
        loss_sum = prior_loss(logits, batch["input_ids"][:, 1:], None, mask, reduction="sum")
        return loss_sum, mask.sum()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss_sum, tokens = self._nll_sum(batch)
        loss = loss_sum.detach() / tokens.clamp(min=1)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ppl", torch.exp(loss), batch_size=bs)
        self.log("train/tokens", tokens.float(), reduce_fx="sum", batch_size=bs)
        return self.token_sum_objective(loss_sum, tokens)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, tokens = self._nll_sum(batch)
        self.val_nll.update(loss_sum / tokens.clamp(min=1), weight=tokens.float())

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log("val/loss", nll, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(nll), prog_bar=True, sync_dist=False)

    def export(self, folder: str | Path) -> Path:
        """Save the LM and its tokenizer as a Hugging Face folder (the input of stage 2)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder

