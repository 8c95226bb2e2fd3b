"""``encoder_free``: raw pixel patches linearly embedded into the LM (Fuyu-style, "U-LVLM")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prior.models.backbones.base import VisionBackbone


class PatchProjector(nn.Module):
    """One linear layer from a flattened pixel patch to the LM width, and the learned
    row-separator embedding that follows each row of patches."""

    def __init__(self, patch_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(patch_dim, lm_dim)
        self.row_sep = nn.Parameter(torch.empty(lm_dim))
        nn.init.normal_(self.row_sep, std=0.02)


class EncoderFree(VisionBackbone):
    """No vision tower: ``patch_size`` x ``patch_size`` pixel patches, normalised to [-1, 1],
    through one linear layer, with a row separator after each row of patches.

    An image of H x W pixels gives ``ceil(H/p)`` rows of ``ceil(W/p)`` patches plus one
    separator each, in raster order. Pixels outside the image (the padding of the last
    row/column of patches, or outside a sample's ``image_mask``) are set to 0 (mid-grey), so a
    sample gives the same tokens alone or padded in a batch; patches with no valid pixel, and
    the separators of rows with none, are masked out in ``token_mask``.
    """

    def __init__(self, lm_dim: int, *, patch_size: int = 8) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.lm_dim = lm_dim
        self.vision = None
        self.projector = PatchProjector(3 * patch_size * patch_size, lm_dim)

    def num_tokens(self, height: int, width: int) -> int:
        """Rows of patches times (patches per row + 1 separator)."""
        p = self.patch_size
        return math.ceil(height / p) * (math.ceil(width / p) + 1)

    def forward(self, images: Tensor, image_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(embeds [B, N, lm_dim], token_mask [B, N])`` with ``N = num_tokens(H, W)``."""
        b, _, h, w = images.shape
        p = self.patch_size
        rows, cols = math.ceil(h / p), math.ceil(w / p)
        pad = (0, cols * p - w, 0, rows * p - h)
        x = F.pad(images.to(self.projector.linear.weight.dtype) * 2 - 1, pad)
        if image_mask is None and not any(pad):
            patch_valid = torch.ones(b, rows, cols, dtype=torch.bool, device=images.device)
        else:
            if image_mask is None:
                image_mask = torch.ones(b, h, w, dtype=torch.bool, device=images.device)
            if image_mask.shape != (b, h, w):
                raise ValueError(
                    f"image_mask {tuple(image_mask.shape)} must be [B, H, W] = {(b, h, w)} like the images"
                )
            mask = F.pad(image_mask, pad, value=False)
            x = x * mask[:, None]
            patch_valid = mask.view(b, rows, p, cols, p).any(dim=4).any(dim=2)
            if not bool(patch_valid[:, 0, 0].all()):
                raise ValueError(
                    "every image needs valid pixels in its top-left patch: image_mask marks each "
                    "image's valid area anchored top-left, as prior.data.datamodule.collate pads"
                )
        patches = x.view(b, 3, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, rows, cols, p * p * 3)
        embeds = self.projector.linear(patches)
        sep = self.projector.row_sep.to(embeds.dtype).expand(b, rows, 1, self.lm_dim)
        embeds = torch.cat([embeds, sep], dim=2).reshape(b, rows * (cols + 1), self.lm_dim)
        row_valid = patch_valid.any(dim=2, keepdim=True)
        token_mask = torch.cat([patch_valid, row_valid], dim=2).reshape(b, rows * (cols + 1))
        return embeds, token_mask
