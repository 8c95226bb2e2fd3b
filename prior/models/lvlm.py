"""The LVLM: a vision backbone feeding input embeddings to any Hugging Face causal LM.

The LM sees one sequence per sample::

    [image tokens (N, some masked out)] [BOS c_1 ... c_k EOS <pad>...]

and the logits kept are those of the positions BOS .. c_k, i.e. the ones that predict the
caption tokens ``input_ids[:, 1:]``. That alignment is a contract: stage-2 weights are stored
per caption token ``ids[1:]``, so ``weights [B, L-1]`` line up with :attr:`LVLMOutput.targets`,
and image tokens, row separators, BOS and padding never carry loss by construction.

Masked image tokens (``token_mask`` False) and caption padding are hidden from attention, and
the position ids count only the visible tokens, so a sample gives the same logits alone or
padded in a batch (up to float tolerance).

``forward(..., hidden=True)`` stops before the LM's head and returns the final hidden states of
the same positions instead, for :func:`prior.loss.linear_token_cross_entropy` with
:attr:`LVLM.head_weight`: the loss then never holds the full ``[B, L-1, V]`` logits.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from prior.config import to_plain
from prior.data.tokenization import fingerprint, load_tokenizer, special_ids
from prior.models.backbones import VisionBackbone, build_backbone
from prior.models.llm import build_llm, embedding_dim

log = logging.getLogger(__name__)

GROUPS = ("vision", "projector", "llm")
"""Parameter groups that freezing works on."""

CONFIG_FILE = "prior_lvlm.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class LVLMOutput:
    """What the loss needs, aligned position by position (position t predicts ``targets[t]``)."""

    logits: Tensor | None
    """``[B, L-1, V]``: LM logits at the positions of ``input_ids[:, :-1]`` (BOS .. last-but-one);
    None when :meth:`LVLM.forward` was asked for the hidden states instead."""
    targets: Tensor
    """``[B, L-1]``: ``input_ids[:, 1:]``, the caption tokens."""
    loss_mask: Tensor
    """``[B, L-1]`` bool: ``attention_mask[:, 1:]``, True on the caption tokens that carry loss."""
    hidden: Tensor | None = None
    """``[B, L-1, d]``: the LM's final hidden states at the same positions, the input of its head
    (``forward(..., hidden=True)`` only)."""


class LVLM(nn.Module):
    """A vision backbone and a causal LM joined through the LM's ``inputs_embeds``.

    ``bos_token_id``/``eos_token_id`` are the tokenizer's under the caption template
    (``prior.data.tokenization.special_ids``); ``backbone_cfg`` (``name`` + options) is what
    :meth:`save_pretrained` records to rebuild the backbone.
    """

    def __init__(
        self,
        backbone: VisionBackbone,
        llm: PreTrainedModel,
        *,
        bos_token_id: int,
        eos_token_id: int,
        backbone_cfg: dict[str, Any],
    ) -> None:
        super().__init__()
        if backbone.lm_dim != embedding_dim(llm):
            raise ValueError(f"backbone width {backbone.lm_dim} != LM embedding width {embedding_dim(llm)}")
        self.backbone = backbone
        self.llm = llm
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.backbone_cfg = dict(backbone_cfg)
        #: How images were prepared for training (``image_size``, ``resize``), saved with the model
        #: so that evaluation prepares them the same way; None when unknown.
        self.preprocessing: dict[str, Any] | None = None
        self.frozen_groups: tuple[str, ...] = ()
        params = inspect.signature(llm.forward).parameters
        # The LM slices its hidden states to the caption positions before its own head (so any
        # logit scaling or soft-capping it applies is kept), via `logits_to_keep`: image
        # positions never get full-vocabulary logits.
        if "logits_to_keep" not in params:
            raise ValueError(
                f"{type(llm).__name__}.forward has no `logits_to_keep` argument: pick a causal LM "
                "whose forward takes it (Llama, Qwen2, GPT-2, Mistral and most decoders do)."
            )
        # transformers 5.24 renamed `past_key_values` to `cache` (old name deprecated until 5.40).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def groups(self) -> dict[str, nn.Module | None]:
        """The parameter groups by the names freezing uses: vision, projector, llm."""
        return {**self.backbone.groups(), "llm": self.llm}

    def train(self, mode: bool = True) -> LVLM:
        """Set training mode; frozen groups (see :func:`apply_freezing`) always stay in eval mode."""
        super().train(mode)
        for name in self.frozen_groups:
            module = self.groups()[name]
            if module is not None:
                module.eval()
        return self

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_mask: Tensor | None = None,
        *,
        hidden: bool = False,
    ) -> LVLMOutput:
        """Logits for the caption tokens given the images (see :class:`LVLMOutput`).

        ``input_ids``/``attention_mask`` ``[B, L]`` are right-padded captions that start with
        BOS (the datamodule's batches); images ``[B, 3, H, W]`` in [0, 1], ``image_mask``
        ``[B, H, W]`` when their sizes differ. ``hidden=True`` returns the final hidden states
        of those positions instead of their logits (``logits`` None), for a loss that applies
        the head itself (:attr:`head_weight`); it refuses an LM whose head is not a plain matmul.
        """
        _check_captions(input_ids, attention_mask)
        if hidden:
            self.check_plain_head()
        attention_mask = attention_mask.bool()
        embeds, mask, n_image = self._embed(images, image_mask, input_ids, attention_mask)
        keep = torch.arange(n_image, n_image + input_ids.shape[1] - 1, device=embeds.device)
        targets, loss_mask = input_ids[:, 1:], attention_mask[:, 1:]
        if hidden:
            states = self._decoder(embeds, mask, _positions(mask))[:, keep]
            return LVLMOutput(logits=None, targets=targets, loss_mask=loss_mask, hidden=states)
        logits = self._lm(embeds, mask, _positions(mask), keep)
        return LVLMOutput(logits=logits, targets=targets, loss_mask=loss_mask)

    @property
    def head_weight(self) -> Tensor:
        """The LM head's weight ``[V, d]`` (the input embeddings' when they are tied): the logits
        are ``hidden @ head_weight.T`` for the LMs :meth:`forward` accepts with ``hidden=True``."""
        self.check_plain_head()
        return self.llm.get_output_embeddings().weight

    def check_plain_head(self) -> None:
        """Raise unless the LM's logits are exactly ``hidden @ head.weight.T``, which is what a
        loss fed with the hidden states and :attr:`head_weight` computes."""
        name = type(self.llm).__name__
        head = self.llm.get_output_embeddings()
        if not isinstance(getattr(head, "weight", None), Tensor):
            raise ValueError(f"{name} has no output embedding with a weight: set model.fused_loss=false.")
        if getattr(head, "bias", None) is not None:
            raise ValueError(
                f"{name}'s head has a bias, which the fused loss (plain hidden @ W.T) would drop: "
                "set model.fused_loss=false."
            )
        config = self.llm.config
        for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1), ("logits_scaling", 1)):
            value = getattr(config, attr, None)
            if value is not None and value != neutral:
                raise ValueError(
                    f"{name} applies {attr}={value} to its logits, which the fused loss (plain "
                    "hidden @ W.T) would skip: set model.fused_loss=false."
                )

    def text_only(self, input_ids: Tensor, attention_mask: Tensor) -> LVLMOutput:
        """:meth:`forward` with the image hidden: the LM reads the caption alone (no image tokens),
        which is what hiding every image token from attention computes, at a fraction of the cost."""
        _check_captions(input_ids, attention_mask)
        mask = attention_mask.bool()
        embeds = self.llm.get_input_embeddings()(input_ids)
        keep = torch.arange(0, input_ids.shape[1] - 1, device=embeds.device)
        logits = self._lm(embeds, mask, _positions(mask), keep)
        return LVLMOutput(logits=logits, targets=input_ids[:, 1:], loss_mask=mask[:, 1:])

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        prompt_ids: list[int] | None = None,
        max_new_tokens: int = 32,
        image_mask: Tensor | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of ``[image tokens][BOS][prompt_ids]`` for each image.

        Returns per image the generated ids, up to but excluding the first EOS (at most
        ``max_new_tokens``). Uses the KV cache. Call ``.eval()`` first: dropout in training
        mode would make the decoding random.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = images.shape[0]
        ids = torch.tensor([self.bos_token_id, *(prompt_ids or [])], device=images.device).expand(b, -1)
        embeds, mask, _ = self._embed(images, image_mask, ids, torch.ones_like(ids, dtype=torch.bool))
        positions = _positions(mask)
        cache = DynamicCache(config=self.llm.config)
        logits = self._lm(embeds, mask, positions, 1, cache)
        steps: list[Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=images.device)
        while True:
            token = logits[:, -1].argmax(dim=-1)
            steps.append(token)
            done |= token == self.eos_token_id
            if bool(done.all()) or len(steps) == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._lm(self.llm.get_input_embeddings()(token[:, None]), mask, positions, 1, cache)
        generated = torch.stack(steps, dim=1).tolist()
        return [row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row for row in generated]

    def save_pretrained(self, folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write ``prior_lvlm.json`` (backbone options, the LM's full config, special ids and
        tokenizer fingerprint), ``model.safetensors`` (the full state) and the tokenizer."""
        if special_ids(tokenizer)[:2] != (self.bos_token_id, self.eos_token_id):
            raise ValueError(
                f"tokenizer's (bos, eos) {special_ids(tokenizer)[:2]} differ from the model's "
                f"{(self.bos_token_id, self.eos_token_id)}: save with the tokenizer the model was built with."
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(folder)
        spec = {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone_cfg,
            "llm_config": json.loads(self.llm.config.to_json_string(use_diff=False)),
            "llm_dtype": str(self.llm.dtype).removeprefix("torch."),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tokenizer_fingerprint": fingerprint(tokenizer),
            "preprocessing": self.preprocessing,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(spec, indent=2))
        save_model(self, str(folder / WEIGHTS_FILE))

    def _embed(
        self, images: Tensor, image_mask: Tensor | None, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor, int]:
        """Input embeddings ``[B, N+L, D]``, their attention mask and ``N``."""
        if images.dim() != 4 or images.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"images {tuple(images.shape)} must be a batch [B, 3, H, W] with one image per caption "
                f"(B = {input_ids.shape[0]}); add a batch dimension to a single image"
            )
        image_embeds, token_mask = self.backbone(images, image_mask)
        text_embeds = self.llm.get_input_embeddings()(input_ids)
        embeds = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)
        mask = torch.cat([token_mask, attention_mask], dim=1)
        return embeds, mask, image_embeds.shape[1]

    def _decoder(self, embeds: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """The final hidden states ``[B, N+L, d]``: what the causal LM's forward feeds its head.

        That forward runs its base model (``base_model``: Llama's and Qwen2's ``model``, GPT-2's
        ``transformer``, final norm included) and then the head, so calling the base model leaves
        out exactly the head.
        """
        out = self.llm.base_model(
            inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def _lm(
        self, embeds: Tensor, mask: Tensor, positions: Tensor, keep: int | Tensor, cache: DynamicCache | None = None
    ) -> Tensor:
        """The LM's logits at the ``keep`` positions (the last ``keep`` if an int)."""
        kwargs: dict[str, Any] = {"use_cache": cache is not None, "logits_to_keep": keep}
        if cache is not None:
            kwargs[self._cache_arg] = cache
        out = self.llm(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, **kwargs)
        return out.logits


def _positions(mask: Tensor) -> Tensor:
    """Position ids that count only the visible tokens (masked ones repeat their predecessor's)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _check_captions(input_ids: Tensor, attention_mask: Tensor) -> None:
    """Raise unless the captions are right-padded, non-empty and at least 2 ids long."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]"
        )
    if input_ids.shape[1] < 2:
        raise ValueError("captions need at least 2 ids ([BOS] + one token) to carry any loss")
    mask = attention_mask.bool()
    if not bool(mask[:, 0].all()) or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "captions must start with BOS at position 0 and be right-padded (attention_mask "
            "True then False): left padding would misalign the logits with the targets"
        )


def apply_freezing(lvlm: LVLM, train: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Train only the listed groups (of ``GROUPS``) and freeze the rest, in eval mode.

    Returns and logs ``{group: (trainable, total)}`` parameter counts.
    """
    unknown = sorted(set(train) - set(GROUPS))
    if unknown:
        raise ValueError(f"Unknown parameter groups {unknown} in `train`: valid ones are {list(GROUPS)}.")
    groups = lvlm.groups()
    grouped: set[int] = set()
    counts: dict[str, tuple[int, int]] = {}
    for name in GROUPS:
        params = list(groups[name].parameters()) if groups[name] is not None else []
        for p in params:
            p.requires_grad_(name in train)
        grouped.update(id(p) for p in params)
        total = sum(p.numel() for p in params)
        counts[name] = (total if name in train else 0, total)
    stray = [n for n, p in lvlm.named_parameters() if id(p) not in grouped]
    if stray:
        raise RuntimeError(f"Parameters outside every group (a backbone breaks its contract): {stray[:5]}")
    lvlm.frozen_groups = tuple(name for name in GROUPS if name not in train)
    lvlm.train(lvlm.training)
    for name, (trainable, total) in counts.items():
        state = "train" if name in train else "frozen"
        log.info("freezing: %-9s %-6s %15s of %15s parameters trainable", name, state, f"{trainable:,}", f"{total:,}")
    return counts


def tower_options(backbone_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a backbone config that build its tower: all but ``name``, and
    ``image_size``, the input size the data is resized to (kept with the model, for its users)."""
    return {k: v for k, v in backbone_cfg.items() if k not in ("name", "image_size")}


def build_lvlm(
    backbone: Mapping[str, Any], llm: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None
) -> LVLM:
    """The LVLM the ``backbone`` and ``llm`` config groups describe, for ``tokenizer``.

    ``backbone`` holds ``name`` and that backbone's options (its ``train`` list is for
    :func:`apply_freezing` and is ignored here); ``llm`` holds :func:`prior.models.llm.build_llm`'s
    keyword arguments. Plain dicts or OmegaConf configs. Without a tokenizer (shape checks on
    the meta device) the vocabulary size and BOS/EOS ids come from ``llm.config``.
    """
    backbone_cfg = {k: v for k, v in to_plain(backbone).items() if k != "train"}
    if "name" not in backbone_cfg:
        raise ValueError("The backbone config needs a `name` (e.g. visual_encoder or encoder_free).")
    lm = build_llm(tokenizer, **to_plain(llm))
    vision = build_backbone(backbone_cfg["name"], embedding_dim(lm), **tower_options(backbone_cfg))
    if tokenizer is not None:
        bos, eos, _ = special_ids(tokenizer)
    else:
        bos, eos = lm.config.bos_token_id, lm.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        if bos is None or eos is None:
            raise ValueError("Without a tokenizer, llm.config must give `bos_token_id` and `eos_token_id`.")
    return LVLM(vision, lm, bos_token_id=bos, eos_token_id=eos, backbone_cfg=backbone_cfg)


def load_lvlm(folder: str | Path) -> tuple[LVLM, PreTrainedTokenizerBase]:
    """Rebuild an LVLM written by :meth:`LVLM.save_pretrained` without any download, in eval mode.

    The LM comes from its saved config and the backbone is built with ``pretrained=False``;
    every weight then comes from ``model.safetensors``.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no exported LVLM ({CONFIG_FILE} + {WEIGHTS_FILE}): pass a folder "
            "written by LVLM.save_pretrained."
        )
    spec = json.loads((folder / CONFIG_FILE).read_text())
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} has format version {spec.get('format_version')}, expected "
            f"{FORMAT_VERSION}: export the model again with this version of prior."
        )
    tokenizer = load_tokenizer(folder)
    if fingerprint(tokenizer) != spec["tokenizer_fingerprint"]:
        raise ValueError(
            f"The tokenizer in {folder} has fingerprint {fingerprint(tokenizer)}, the model was saved "
            f"with {spec['tokenizer_fingerprint']}: the folder was modified; export it again."
        )
    llm_config = dict(spec["llm_config"])
    cfg = AutoConfig.for_model(llm_config.pop("model_type"), **llm_config)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, spec["llm_dtype"]))
    backbone_cfg = dict(spec["backbone"])
    options = tower_options(backbone_cfg)
    if "pretrained" in options:
        options["pretrained"] = False  # every weight comes from model.safetensors
    vision = build_backbone(backbone_cfg["name"], embedding_dim(lm), **options)
    lvlm = LVLM(
        vision, lm, bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"], backbone_cfg=backbone_cfg
    )
    lvlm.preprocessing = spec.get("preprocessing")  # absent from exports older than the field
    # The model is built with random init, then overwritten: simple, at the price of one
    # wasted initialisation (seconds for a 3B model).
    load_model(lvlm, str(folder / WEIGHTS_FILE), strict=True)
    return lvlm.eval(), tokenizer
