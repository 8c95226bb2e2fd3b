"""Stage 3: LVLM training with the PRIOR loss (weights from sidecars or online) or plain NTP.

The ``loss`` config picks the objective:

- ``ntp``: every caption token weighs the same;
- ``prior``: weights ``(1 - p_ref) ** alpha`` from the stage-2 sidecars (``batch["ref_logprobs"]``);
- ``prior_online``: the frozen reference LM scores each batch inside the training step (no stage 2;
  same weights as the sidecars, at the cost of one reference forward per step).

Both the optimised loss and the plain NTP loss of every batch are logged (``train/loss``,
``train/ntp_loss``), so runs with different objectives compare on one chart, together with the
weight statistics (mean, std, effective number of tokens per caption).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM

from prior.data.tokenization import fingerprint, load_tokenizer
from prior.loss import effective_weights, token_cross_entropy, token_weights, weight_stats
from prior.models.lvlm import apply_freezing, build_lvlm
from prior.config import to_plain
from prior.modules.base import TokenLossModule
from prior.modules.reference_lm import caption_logprobs

LOSSES = ("ntp", "prior", "prior_online")


class LVLMModule(TokenLossModule):
    """An LVLM (``backbone`` + ``llm`` config groups) trained on image-caption batches."""

    def __init__(
        self,
        backbone: dict[str, Any],
        llm: dict[str, Any],
        tokenizer: str,
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        save_frozen: bool = True,
    ) -> None:
        super().__init__()
        backbone, llm, loss, optimizer, scheduler = map(to_plain, (backbone, llm, loss, optimizer, scheduler))
        self.save_hyperparameters()  # plain containers, so checkpoints load with weights_only
        if loss["name"] not in LOSSES:
            raise ValueError(f"Unknown loss {loss['name']!r}: choose one of {LOSSES} (`loss=...`).")
        self.loss_name: str = loss["name"]
        self.alpha = float(loss.get("alpha", 1.0))
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = build_lvlm(backbone, llm, self.tokenizer)
        self.group_counts = apply_freezing(self.model, list(backbone.get("train", ["vision", "projector", "llm"])))
        # Frozen parts are rebuilt from their config or pretrained weights when loading.
        self.strict_loading = save_frozen
        self._reference: list[torch.nn.Module] = []  # kept out of the state dict and optimizer
        if self.loss_name == "prior_online":
            self._reference.append(self._load_reference(loss.get("reference")))
        self.last_weights: torch.Tensor | None = None  # for the weight histogram callback
        self.val_ntp = MeanMetric()
        self.val_prior = MeanMetric()

    def _load_reference(self, path: str | None) -> torch.nn.Module:
        if not path:
            raise ValueError("loss=prior_online needs `loss.reference`: the reference LM folder from stage 1.")
        ref_tok = load_tokenizer(path)
        if fingerprint(ref_tok) != fingerprint(self.tokenizer):
            raise ValueError(
                f"The reference LM at {path} uses tokenizer {fingerprint(ref_tok)}, the LVLM uses "
                f"{fingerprint(self.tokenizer)}: both must tokenize captions the same way."
            )
        return AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)

    # ------------------------------------------------------------------ weights and loss

    def ref_logprobs(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Reference log-probs of the caption tokens, [B, L-1], or None for NTP."""
        if self.loss_name == "ntp":
            return None
        if self.loss_name == "prior":
            if "ref_logprobs" not in batch:
                raise ValueError("loss=prior needs weights in the batch: the data config needs `with_weights: true`.")
            return batch["ref_logprobs"]
        reference = self._reference[0]
        if next(reference.parameters()).device != self.device:
            reference.to(self.device)
        with torch.no_grad():
            return caption_logprobs(reference, batch["input_ids"], batch["attention_mask"])

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("image_mask"))
        ce = token_cross_entropy(out.logits, out.targets, out.loss_mask)
        tokens = out.loss_mask.sum()
        result = {"ntp_sum": ce.sum(), "tokens": tokens, "mask": out.loss_mask}
        ref = self.ref_logprobs(batch)
        if ref is None:
            result["objective_sum"] = result["ntp_sum"]
        else:
            w = token_weights(ref, self.alpha)
            result["weights"] = w
            result["objective_sum"] = (effective_weights(w, out.loss_mask) * ce).sum()
        return result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        r = self._losses(batch)
        n = r["tokens"].clamp(min=1)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", r["objective_sum"].detach() / n, prog_bar=True, batch_size=bs)
        self.log("train/ntp_loss", r["ntp_sum"].detach() / n, batch_size=bs)
        if "weights" in r:
            self.last_weights = r["weights"][r["mask"]].detach()
            for name, value in weight_stats(r["weights"], r["mask"]).items():
                self.log(f"weights/{name}", value, batch_size=bs)
        return self.token_sum_objective(r["objective_sum"], r["tokens"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        r = self._losses(batch)
        n = r["tokens"].clamp(min=1).float()
        self.val_ntp.update(r["ntp_sum"] / n, weight=n)
        self.val_prior.update(r["objective_sum"] / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        ntp = self.val_ntp.compute()
        self.log("val/ntp_loss", ntp, prog_bar=True)
        self.log("val/ppl", torch.exp(ntp))
        self.log("val/loss", self.val_prior.compute())
        self.val_ntp.reset()
        self.val_prior.reset()

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Without ``save_frozen``, checkpoints hold the trainable parameters only."""
        if not self.hparams.save_frozen:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k in trainable or not k.startswith("model.")
            }

    def export(self, folder: str | Path) -> Path:
        """Save the LVLM with its tokenizer for ``prior.load`` (inference and evaluation)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, self.tokenizer)
        return folder
