"""The demo's vision tower: a tiny timm ViT pre-trained on shape-world images with attribute heads.

It stands in for CLIP in the paper's H-LVLM setting: pre-trained once on an image split disjoint
from the LVLM's training data, exported as a timm folder (``local-dir:<folder>``), then frozen.
For every column of the demo's 3-column grid a linear head on the mean patch feature predicts
whether an object is there and, if so, its shape, colour and size (from the sample's json), so
the patch features must carry what a caption describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from prior.config import to_plain
from prior.demo.corpus import COLORS, POSITIONS, SHAPES, SIZES
from prior.modules.base import TokenLossModule

#: Per column: (name, number of classes); "present" is 2-way, the others apply where present.
HEADS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("present", ("no", "yes")),
    ("shape", SHAPES),
    ("color", COLORS),
    ("size", SIZES),
)


def attribute_targets(metas: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Per head, class ids ``[B, columns]`` from the samples' json; -100 where no object stands."""
    targets = {name: torch.full((len(metas), len(POSITIONS)), -100, dtype=torch.long) for name, _ in HEADS}
    targets["present"].zero_()
    for row, meta in enumerate(metas):
        if "objects" not in meta:
            raise ValueError("Vision tower pre-training needs the demo corpus json (`objects`) for every sample.")
        for obj in meta["objects"]:
            col = POSITIONS.index(obj["position"])
            targets["present"][row, col] = 1
            for name, classes in HEADS[1:]:
                targets[name][row, col] = classes.index(obj[name])
    return targets


class VisionTowerPretraining(TokenLossModule):
    """A timm ViT (``timm_name`` + ``timm_kwargs``, random init) with per-column attribute heads."""

    def __init__(
        self,
        timm_name: str,
        timm_kwargs: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        timm_kwargs, optimizer, scheduler = map(to_plain, (timm_kwargs, optimizer, scheduler))
        self.save_hyperparameters()
        self.tower = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
        width = self.tower.num_features
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(POSITIONS) * len(c)) for name, c in HEADS})
        cfg = self.tower.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.val_acc = nn.ModuleDict({name: MeanMetric() for name, _ in HEADS})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per head, ``[B, columns, classes]``."""
        tokens = self.tower.forward_features((images - self.mean) / self.std)
        pooled = tokens[:, self.tower.num_prefix_tokens :].mean(dim=1)
        return {name: self.heads[name](pooled).view(len(images), len(POSITIONS), -1) for name in self.heads}

    def _step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        logits = self(batch["images"])
        targets = {k: v.to(self.device) for k, v in attribute_targets(batch["meta"]).items()}
        loss_sum = sum(
            F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), reduction="sum") for k in logits
        )
        count = sum((t != -100).sum() for t in targets.values())
        return loss_sum, count, logits, targets

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss_sum, count, _, _ = self._step(batch)
        self.log("train/loss", loss_sum.detach() / count.clamp(min=1), prog_bar=True, batch_size=len(batch["images"]))
        return self.token_sum_objective(loss_sum, count)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, _, logits, targets = self._step(batch)
        for name, metric in self.val_acc.items():
            valid = targets[name] != -100
            hits = (logits[name].argmax(-1) == targets[name])[valid].float()
            if hits.numel():
                metric.update(hits.mean(), weight=hits.numel())

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_acc.items():
            self.log(f"val/{name}_acc", metric.compute(), prog_bar=name == "color")
            metric.reset()

    def export(self, folder: str | Path) -> Path:
        """Save the tower without its heads as a timm folder: ``timm.create_model("local-dir:<folder>")``."""
        folder = Path(folder)
        timm.models.save_for_hf(self.tower, folder, safe_serialization=True)
        return folder
