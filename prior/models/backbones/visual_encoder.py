"""``visual_encoder``: a timm vision transformer and an MLP projector (LLaVA-style, "H-LVLM")."""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prior.models.backbones.base import VisionBackbone


def mlp_projector(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` linear layers with GELU between them (depth 1: linear; 2: LLaVA's mlp2x_gelu)."""
    if depth < 1:
        raise ValueError(f"projector_depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class VisualEncoder(VisionBackbone):
    """Patch features of one block of a timm ViT, projected into the LM width.

    Images are resized (bicubic, antialiased) to the tower's input size when they differ
    from it and normalised with the mean/std of the model's pretrained config; with an
    ``image_mask`` each image's valid area is resized on its own. The tower yields one token
    per patch (prefix tokens such as CLS or registers are dropped), so ``num_tokens`` does not
    depend on the input size. ``feature_layer`` indexes the tower's blocks like a Python list
    (-1: last block, -2: penultimate as in LLaVA); the output of that block is taken without
    the final norm, and the blocks after it are removed from the model.
    """

    def __init__(
        self,
        lm_dim: int,
        *,
        timm_name: str,
        pretrained: bool = False,
        timm_kwargs: dict[str, Any] | None = None,
        feature_layer: int = -2,
        projector_depth: int = 2,
    ) -> None:
        super().__init__()
        tower = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **(timm_kwargs or {}))
        img_size = getattr(getattr(tower, "patch_embed", None), "img_size", None)
        api = ("forward_intermediates", "prune_intermediate_layers", "blocks")
        if img_size is None or not all(hasattr(tower, a) for a in api):
            raise ValueError(
                f"timm model {timm_name!r} is not a ViT with a fixed input size and timm's "
                "intermediate-layer API (forward_intermediates); pick a ViT such as "
                "'vit_large_patch14_clip_336.openai'."
            )
        num_blocks = len(tower.blocks)
        if not -num_blocks <= feature_layer < num_blocks:
            raise ValueError(f"feature_layer {feature_layer} is out of range for {timm_name!r}'s {num_blocks} blocks")
        self.feature_index = feature_layer % num_blocks
        # The blocks after the feature layer, the final norm and the head never reach the LM:
        # removing them saves memory and leaves no parameters without gradient (DDP).
        tower.prune_intermediate_layers([self.feature_index], prune_norm=True, prune_head=True)
        self.vision = tower
        self.projector = mlp_projector(tower.embed_dim, lm_dim, projector_depth)
        self.lm_dim = lm_dim
        self.input_size = (int(img_size[0]), int(img_size[1]))
        self.grid = tuple(int(g) for g in tower.patch_embed.grid_size)
        cfg = tower.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def num_tokens(self, height: int, width: int) -> int:
        """Patches of the tower's grid: every image is resized to its input size first."""
        return math.prod(self.grid)

    def forward(self, images: Tensor, image_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(embeds [B, N, lm_dim], token_mask [B, N])``; every image token is valid."""
        if image_mask is None:
            x = self._resize(images)
        else:
            # Each image's valid area (anchored top-left) is resized to the tower's size alone.
            rows = image_mask.any(dim=2).sum(dim=1).tolist()
            cols = image_mask.any(dim=1).sum(dim=1).tolist()
            x = torch.cat([self._resize(img[None, :, :h, :w]) for img, h, w in zip(images, rows, cols)])
        x = ((x - self.mean) / self.std).to(self.projector[0].weight.dtype)
        (features,) = self.vision.forward_intermediates(
            x, indices=[self.feature_index], norm=False, output_fmt="NLC", intermediates_only=True
        )
        embeds = self.projector(features)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)

    def _resize(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) == self.input_size:
            return images.float()
        resized = F.interpolate(
            images.float(), size=self.input_size, mode="bicubic", align_corners=False, antialias=True
        )
        return resized.clamp_(0.0, 1.0)
