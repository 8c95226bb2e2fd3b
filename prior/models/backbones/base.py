"""The contract every vision backbone of the LVLM fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class VisionBackbone(nn.Module, ABC):
    """Turns images into a sequence of input embeddings for a causal LM.

    A backbone declares:

    - ``lm_dim``: the width of its output, the LM's embedding width;
    - ``num_tokens(height, width)``: how many image positions an image of that size yields
      (the length ``N`` of its output, masked positions included);
    - two parameter groups for freezing: ``vision`` (the vision tower, ``None`` when there is
      none) and ``projector`` (everything that maps into the LM width). Together they hold
      every parameter of the backbone.

    ``forward`` takes images ``[B, 3, H, W]`` with values in [0, 1] (normalising them is the
    backbone's job) and an optional ``image_mask`` ``[B, H, W]`` (True on the valid pixels,
    each image's valid area anchored top-left, as ``prior.data.datamodule.collate`` pads).
    It returns ``(embeds [B, N, lm_dim], token_mask [B, N] bool)``; ``token_mask`` is False
    at positions that belong to no real image content (the LM must not attend to them).
    """

    lm_dim: int
    vision: nn.Module | None
    projector: nn.Module

    @abstractmethod
    def num_tokens(self, height: int, width: int) -> int:
        """Number of image positions for an image of ``height`` x ``width`` pixels."""

    @abstractmethod
    def forward(self, images: Tensor, image_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(embeds [B, N, lm_dim], token_mask [B, N] bool)`` for images ``[B, 3, H, W]`` in [0, 1]."""

    def groups(self) -> dict[str, nn.Module | None]:
        """The parameter groups of this backbone, by the names freezing uses."""
        return {"vision": self.vision, "projector": self.projector}
