"""Stage 3: LVLM training with a token-weighted loss (``prior.weighting``) or plain NTP.

The ``loss`` config picks the weighting scheme and its knobs (``loss=ntp|prior|prior_online|rho|
cal|dpa|oracle``, see :mod:`prior.weighting`); this module provides what the scheme needs (the
reference LM's log-probabilities from the sidecars or an online pass, the LVLM's own logits with
the image hidden, the visual-word flags of the demo corpus) and applies the weights.

Both the optimised loss and the plain NTP loss of every batch are logged (``train/loss``,
``train/ntp_loss``), so runs with different objectives compare on one chart, together with the
weight statistics (mean, std, effective number of tokens per caption).

``fused_loss`` (``auto`` by default) computes the loss from the LM's final hidden states and head weight
(:func:`prior.loss.linear_token_cross_entropy`), so the ``[B, L-1, V]`` logits and their gradient
never exist at full size. It needs the weights before the loss, so it applies to the schemes
whose weights do not depend on the LVLM's own predictions (``ntp``, ``prior``, ``prior_online``,
``oracle``: ``not Weighting.needs_lvlm``); ``rho``, ``dpa`` (the LVLM's cross-entropy) and ``cal``
(its target logits with and without the image) keep the logits path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric

from prior.config import to_plain
from prior.data.tokenization import load_tokenizer
from prior.loss import linear_token_cross_entropy, token_cross_entropy, weight_stats
from prior.models.lvlm import LVLMOutput, apply_freezing, build_lvlm
from prior.models.reference import load_reference
from prior.modules.base import TokenLossModule
from prior.modules.reference_lm import caption_logprobs
from prior.weighting import WeightInputs, build_weighting


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
        preprocessing: dict[str, Any] | None = None,
        fused_loss: bool | str = "auto",
    ) -> None:
        super().__init__()
        backbone, llm, loss, optimizer, scheduler, preprocessing = map(
            to_plain, (backbone, llm, loss, optimizer, scheduler, preprocessing))
        self.save_hyperparameters()  # plain containers, so checkpoints load with weights_only
        self.weighting = build_weighting(loss)
        self.tokenizer = load_tokenizer(tokenizer)
        self.model = build_lvlm(backbone, llm, self.tokenizer)
        self.model.preprocessing = dict(preprocessing) if preprocessing else None
        self.group_counts = apply_freezing(self.model, list(backbone.get("train", ["vision", "projector", "llm"])))
        self.fused_loss = self._use_fused_loss(fused_loss)
        # Frozen parts are rebuilt from their config or pretrained weights when loading.
        self.strict_loading = save_frozen
        self._reference: list[torch.nn.Module] = []  # kept out of the state dict and optimizer
        if self.weighting.reference is not None:
            self._reference.append(self._load_reference(self.weighting.reference))
        self._last_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # see last_weights
        self.val_ntp = MeanMetric()
        self.val_prior = MeanMetric()

    @property
    def loss_name(self) -> str:
        return self.weighting.name

    def _use_fused_loss(self, fused_loss: bool | str) -> bool:
        """``auto``: the fused loss wherever it applies (a scheme whose weights come before the
        loss, an LM whose logits are plain ``hidden @ W.T``); ``true``: the same, an error for
        an LM it cannot serve; ``false``: the logits path. Decided at build time, not at step 1."""
        if fused_loss not in (True, False, "auto"):
            raise ValueError(f"model.fused_loss must be true, false or auto, got {fused_loss!r}")
        if fused_loss is False or self.weighting.needs_lvlm:
            return False
        try:
            self.model.check_plain_head()
        except ValueError:
            if fused_loss is True:
                raise
            return False
        return True

    @property
    def last_weights(self) -> torch.Tensor | None:
        """The raw weights of the last training batch's loss tokens (the weight histogram's),
        selected only when asked: a boolean index waits for the GPU, once per step otherwise."""
        if self._last_weights is None:
            return None
        weights, mask = self._last_weights
        return weights[mask]

    def _load_reference(self, path: str) -> torch.nn.Module:
        return load_reference(path, tokenizer=self.tokenizer)

    # ------------------------------------------------------------------ weights and loss

    def ref_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """Reference log-probs of the caption tokens, [B, L-1]: the sidecars' or an online pass."""
        if not self._reference:
            if "ref_logprobs" not in batch:
                raise ValueError(
                    f"loss={self.loss_name} needs the stage-2 weights in the batch, and the data has none: "
                    "run `make weights` (prior-weights) for these shards, or set `loss.reference` to the "
                    "reference LM folder to score each batch online."
                )
            return batch["ref_logprobs"]
        reference = self._reference[0]
        if next(reference.parameters()).device != self.device:
            reference.to(self.device)
        with torch.no_grad():
            return caption_logprobs(reference, batch["input_ids"], batch["attention_mask"])

    def weight_inputs(self, batch: dict[str, Any], out: LVLMOutput, ce: torch.Tensor | None) -> WeightInputs:
        """What the scheme needs for this batch (see :class:`prior.weighting.WeightInputs`);
        ``ce`` may be None (and ``out`` hold no logits) for a scheme that does not need the LVLM."""
        needs = self.weighting.needs
        mask = out.loss_mask
        inputs = WeightInputs(loss_mask=mask, ce=None if ce is None else ce.detach())
        if "reference" in needs:
            inputs.ref_logprobs = self.ref_logprobs(batch)
        if "text_only" in needs:  # the image's gain on the target logit (CAL)
            inputs.target_logits = _target_logits(out.logits.detach(), out.targets, mask)
            with torch.no_grad():
                text = self.model.text_only(batch["input_ids"], batch["attention_mask"])
            inputs.text_target_logits = _target_logits(text.logits, text.targets, mask)
        if "visual" in needs:
            inputs.visual = self._visual_flags(batch, mask)
        return inputs

    def _visual_flags(self, batch: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """True on the caption tokens that the samples' json marks as visual words (demo corpus)."""
        from prior.demo.token_kinds import token_labels

        if "meta" not in batch or "captions" not in batch:
            raise ValueError("loss=oracle needs each batch's captions and json (`meta`): use the demo corpus.")
        flags = torch.zeros(mask.shape, dtype=torch.bool)
        for i, (caption, meta) in enumerate(zip(batch["captions"], batch["meta"], strict=True)):
            if not meta.get("spans"):
                raise ValueError(
                    f"loss=oracle needs the word spans of the demo corpus's json; sample {batch['keys'][i]} has none."
                )
            n = int(mask[i].sum())
            labels = token_labels(self.tokenizer, caption, meta, n)
            flags[i, :n] = torch.tensor(["visual" in kinds for kinds in labels], dtype=torch.bool)
        return flags.to(mask.device)

    def token_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The raw weights ``[B, L-1]`` the loss gives this batch's caption tokens (None for NTP),
        computed without gradient as in a training step: what the sample table shows."""
        if self.loss_name == "ntp":
            return None
        with torch.no_grad():
            out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("image_mask"))
            ce = token_cross_entropy(out.logits, out.targets, out.loss_mask)
            return self.weighting.raw_weights(self.weight_inputs(batch, out, ce))

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.fused_loss:
            return self._fused_losses(batch)
        out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("image_mask"))
        ce = token_cross_entropy(out.logits, out.targets, out.loss_mask)
        tokens = out.loss_mask.sum()
        result = {"ntp_sum": ce.sum(), "tokens": tokens, "mask": out.loss_mask}
        if self.loss_name == "ntp":
            result["objective_sum"] = result["ntp_sum"]
        else:
            w = self.weighting.raw_weights(self.weight_inputs(batch, out, ce))
            result["weights"] = w
            result["objective_sum"] = (self.weighting.effective(w, out.loss_mask) * ce).sum()
        return result

    def _fused_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`_losses` from the hidden states: the weights first, then one fused head + loss.

        Same keys and values (up to float rounding); ``ntp_sum`` carries gradient only for NTP,
        where it is the objective (the loss backpropagates ``objective_sum`` alone).
        """
        out = self.model(
            batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("image_mask"), hidden=True
        )
        mask = out.loss_mask
        result = {"tokens": mask.sum(), "mask": mask}
        w = None
        if self.loss_name != "ntp":
            w = self.weighting.raw_weights(self.weight_inputs(batch, out, None))
            result["weights"] = w
        coef = self.weighting.effective(w, mask)  # 1 on the loss tokens for NTP
        objective, ce = linear_token_cross_entropy(
            out.hidden[mask], self.model.head_weight, out.targets[mask], coef[mask]
        )
        result["objective_sum"] = objective
        result["ntp_sum"] = objective if w is None else ce.sum()
        return result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        r = self._losses(batch)
        n = r["tokens"].clamp(min=1)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", r["objective_sum"].detach() / n, prog_bar=True, batch_size=bs)
        self.log("train/ntp_loss", r["ntp_sum"].detach() / n, batch_size=bs)
        if "weights" in r:
            self._last_weights = (r["weights"].detach(), r["mask"])
            for name, value in weight_stats(r["weights"], r["mask"], self.weighting.normalise).items():
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


def _target_logits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each position's logit of its target token ``[B, T]`` in fp32, 0 off the mask."""
    safe = torch.where(mask, targets, 0)
    return torch.where(mask, logits.gather(-1, safe[..., None]).squeeze(-1).float(), 0.0)
