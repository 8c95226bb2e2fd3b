"""Export a PRIOR LVLM to plain Hugging Face classes, loadable without this package.

A folder written by :meth:`prior.models.lvlm.LVLM.save_pretrained` loads only through
``prior.load``. :func:`export_hf` rewrites it as a transformers checkpoint with its processor:

- ``visual_encoder`` (timm ViT + MLP projector) -> ``LlavaForConditionalGeneration`` +
  ``LlavaProcessor``. The timm tower becomes a native ``ViTModel`` (no pre-norm) or
  ``CLIPVisionModel`` (timm's ``pre_norm``), weights converted one to one; the feature block
  becomes the tower's last layer (blocks after it were pruned in training), read with
  ``vision_feature_layer=-1`` before the final norm and ``vision_feature_select_strategy=
  "default"`` (CLS dropped), exactly what the project feeds the projector. Llava's
  ``timm_wrapper`` vision config does not map: ``TimmWrapperModel`` returns timm's default
  ``forward_intermediates`` output, NCHW, which ``LlavaModel.get_image_features`` slices and
  projects as if it were [B, L, C].
- ``encoder_free`` (linear patch embedding + learned row separator) -> ``FuyuForCausalLM`` +
  ``FuyuProcessor``. Fuyu flattens patches in the same (row, column, channel) order and ends each
  row with its ``|NEWLINE|`` token: the learned separator becomes that token's row of the LM's
  embedding table.

Both add special tokens to the tokenizer (the image placeholder, and for Fuyu the newline); their
extra logit columns are suppressed in generation (``generation_config.suppress_tokens``), so
greedy decoding matches ``LVLM.generate``. The Llava export has a chat template writing the same
prompt (images, BOS, text: :func:`llava_chat_template`), which lmms-eval's ``llava_hf`` applies.
Parts that do not map (another projector depth, a tower with registers or layer scale, an LM head
with a bias or logit soft-capping, a tokenizer FuyuProcessor cannot drive) raise
:class:`UnmappableError` naming the part; ``format="auto"`` then keeps the project format instead.
``prior_export.json`` in the output records the kind, the prompt layout and every approximation
of the preprocessing.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    FuyuConfig,
    FuyuForCausalLM,
    FuyuImageProcessorPil,
    FuyuProcessor,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import PILImageResampling

from prior.data.tokenization import encode_caption, special_ids
from prior.models.backbones import EncoderFree, VisualEncoder
from prior.models.lvlm import LVLM, load_lvlm

log = logging.getLogger(__name__)

EXPORT_FILE = "prior_export.json"
"""What the export mapped and how to prompt it, written next to the transformers files."""
FORMATS = ("hf", "auto")
LLAVA_IMAGE_TOKEN = "<image>"
FUYU_IMAGE_TOKEN = "|SPEAKER|"  # FuyuProcessor hard-codes both names
FUYU_NEWLINE_TOKEN = "|NEWLINE|"
FUYU_BOS_STRING = "<s>"  # FuyuProcessor writes its BOS as this literal string
FUYU_ANSWER_STRING = "<0x04>"  # FuyuProcessor appends it to every prompt


class UnmappableError(ValueError):
    """A part of the LVLM has no exact counterpart in the transformers classes."""


def export_hf(src: str | Path, out: str | Path, *, format: str = "hf", overwrite: bool = False) -> str:
    """Export the LVLM folder ``src`` (``LVLM.save_pretrained``) to ``out`` and return its kind.

    ``format="hf"``: a transformers checkpoint + processor (``"llava"`` or ``"fuyu"``), or
    :class:`UnmappableError` naming the part that does not map, with nothing written.
    ``format="auto"``: the same, or where a part does not map a copy of the project format
    (``"prior"``, load it with ``prior.load``) after logging why. ``out`` must be empty or absent
    unless ``overwrite``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"out ({out}) must differ from the model folder ({src})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: pass another folder, or overwrite=True to replace it.")
    lvlm, tokenizer = load_lvlm(src)
    tmp = Path(tempfile.mkdtemp(prefix="prior-hf-export-"))
    try:
        try:
            kind = _export(lvlm, tokenizer, tmp)
        except UnmappableError as err:
            if format == "hf":
                raise
            log.warning("%s\nKeeping the project format: load %s with prior.load.", err, out)
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            kind = "prior"
        if out.exists():
            shutil.rmtree(out)  # empty, or overwrite: replaced only once the export succeeded
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kind


def _export(lvlm: LVLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> str:
    """Write the transformers export of ``lvlm`` into ``out``; its kind."""
    check_lm_head(lvlm)
    if isinstance(lvlm.backbone, VisualEncoder):
        info = export_llava(lvlm, tokenizer, out)
    elif isinstance(lvlm.backbone, EncoderFree):
        info = export_fuyu(lvlm, tokenizer, out)
    else:
        raise UnmappableError(f"backbone {type(lvlm.backbone).__name__} has no transformers counterpart")
    tower_dtype = next(lvlm.backbone.parameters()).dtype
    if tower_dtype != lvlm.llm.dtype:
        info["notes"].append(
            f"dtype: the project runs the vision side in {tower_dtype} and the LM in {lvlm.llm.dtype}; "
            f"the export holds everything in {lvlm.llm.dtype}"
        )
    info["source_config"] = json.loads(json.dumps({"backbone": lvlm.backbone_cfg, "preprocessing": lvlm.preprocessing}))
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2))
    return info["kind"]


# --------------------------------------------------------------------------- the LM


def check_lm_head(lvlm: LVLM) -> None:
    """Raise unless the LM's logits are ``hidden @ W.T``: Llava's and Fuyu's ``lm_head`` is a
    plain bias-free linear layer over the text model's last hidden state."""
    name = type(lvlm.llm).__name__
    head = lvlm.llm.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), Tensor):
        raise UnmappableError(f"LM head: {name} has no output embedding with a weight, which lm_head needs")
    if getattr(head, "bias", None) is not None:
        raise UnmappableError(f"LM head: {name}'s head has a bias; Llava's and Fuyu's lm_head has none")
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1), ("logits_scaling", 1)):
        value = getattr(lvlm.llm.config, attr, None)
        if value is not None and value != neutral:
            raise UnmappableError(
                f"LM head: {name} applies {attr}={value} to its logits; Llava's and Fuyu's lm_head does not"
            )


def _with_tokens(
    tokenizer: PreTrainedTokenizerBase, tokens: list[str], rows: int, folder: Path
) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """A copy of ``tokenizer`` with ``tokens`` added as special tokens at ids ``rows`` onwards
    (``rows`` = the LM's embedding rows; unused filler tokens first if the tokenizer is shorter)."""
    tok = copy.deepcopy(tokenizer)
    clash = [t for t in tokens if t in tok.get_vocab()]
    if clash:
        raise UnmappableError(f"tokenizer: it already has {clash}, which the export must add as new image tokens")
    if len(tok) > rows:
        raise UnmappableError(f"tokenizer: {len(tok)} ids but the LM embeds only {rows}")
    filler = [f"<|prior_unused_{i}|>" for i in range(rows - len(tok))]
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in filler + tokens], special_tokens=True)
    tok.save_pretrained(folder)
    ids = tok.convert_tokens_to_ids(tokens)
    if ids != list(range(rows, rows + len(tokens))):
        raise UnmappableError(f"tokenizer: the new tokens {tokens} got ids {ids}, expected {rows}.. (embedding rows)")
    return tok, ids


def _text_config(lvlm: LVLM, vocab_size: int) -> Any:
    """The LM's config with the vocabulary grown to ``vocab_size``."""
    cfg = json.loads(lvlm.llm.config.to_json_string(use_diff=False))
    cfg["vocab_size"] = vocab_size
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _embedding_name(lvlm: LVLM) -> str:
    """The name of the input embedding table in the LM's base model's state dict."""
    embed = lvlm.llm.get_input_embeddings().weight
    names = [k for k, v in lvlm.llm.base_model.state_dict().items() if v.data_ptr() == embed.data_ptr()]
    if len(names) != 1:
        raise UnmappableError(f"LM: cannot find its input embedding in {type(lvlm.llm.base_model).__name__}'s weights")
    return names[0]


def _tied(lvlm: LVLM, notes: list[str]) -> bool:
    """Whether the export ties its lm_head to the embeddings: as the LM does, except where the
    wrapper cannot (Llava and Fuyu tie ``language_model.embed_tokens`` by name; GPT-2 calls it
    ``wte``): the head is then saved as an untied copy, with the same logits."""
    if not getattr(lvlm.llm.config, "tie_word_embeddings", False):
        return False
    if _embedding_name(lvlm) == "embed_tokens.weight":
        return True
    notes.append(f"LM head: tied to {_embedding_name(lvlm)} in the LM, saved as an untied copy (same logits)")
    return False


def _load_lm(lvlm: LVLM, language_model: nn.Module, lm_head: nn.Linear, new_rows: Tensor, tied: bool) -> None:
    """Copy the LM into ``language_model`` (its base model) and ``lm_head``, the input embedding
    table grown by ``new_rows``; an untied head gets zero rows there (suppressed in generation)."""
    embed = lvlm.llm.get_input_embeddings().weight.detach()
    state = lvlm.llm.base_model.state_dict()
    state[_embedding_name(lvlm)] = torch.cat([embed, new_rows.to(embed)], dim=0)
    language_model.load_state_dict(state, strict=True)
    if not tied:
        head = lvlm.llm.get_output_embeddings().weight.detach()
        lm_head.weight.data.copy_(torch.cat([head, head.new_zeros(new_rows.shape)], dim=0))


def _generation_config(lvlm: LVLM, tokenizer: PreTrainedTokenizerBase, suppress: list[int]) -> GenerationConfig:
    """Greedy decoding as ``LVLM.generate``: stops at EOS, never emits the image tokens."""
    return GenerationConfig(
        bos_token_id=lvlm.bos_token_id,
        eos_token_id=lvlm.eos_token_id,
        pad_token_id=special_ids(tokenizer)[2],
        do_sample=False,
        suppress_tokens=suppress,
    )


# --------------------------------------------------------------------------- Llava


def _vision_tower(tower: nn.Module) -> tuple[Any, dict[str, Tensor], list[str]]:
    """``(config, state dict, notes)`` of the transformers ViT / CLIP vision model computing
    the same block outputs as the timm ViT ``tower`` (pruned after the feature block)."""
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    def refuse(part: str) -> UnmappableError:
        return UnmappableError(
            f"vision tower: {part}; only a plain timm ViT (one class token, learned absolute positions, "
            "pre-norm LayerNorm blocks, GELU/QuickGELU MLP) maps onto transformers' ViTModel/CLIPVisionModel."
        )

    if type(tower) is not VisionTransformer:
        raise refuse(f"{type(tower).__name__} is not timm's VisionTransformer")
    if tower.num_prefix_tokens != 1 or tower.cls_token is None:
        raise refuse(f"{tower.num_prefix_tokens} prefix tokens (class token + registers), not one class token")
    if tower.pos_embed is None or tower.no_embed_class or getattr(tower, "dynamic_img_size", False):
        raise refuse("its position embedding is not a learned table covering the class token")
    if getattr(tower, "rope", None) is not None:
        raise refuse("rotary position embeddings")
    patch = tower.patch_embed
    if type(patch) is not PatchEmbed or not isinstance(patch.norm, nn.Identity):
        raise refuse("its patch embedding is not a plain convolution")
    if not isinstance(tower.patch_drop, nn.Identity):
        raise refuse("patch dropout")
    pre_norm = not isinstance(tower.norm_pre, nn.Identity)
    if pre_norm and not isinstance(tower.norm_pre, nn.LayerNorm):
        raise refuse(f"its pre-norm is a {type(tower.norm_pre).__name__}")
    blocks = list(tower.blocks)
    acts, eps = set(), set()
    for i, blk in enumerate(blocks):
        attn, mlp = blk.attn, blk.mlp
        plain = (
            type(blk) is Block and type(attn) is Attention and type(mlp) is Mlp
            and all(isinstance(getattr(blk, n), nn.Identity) for n in ("ls1", "ls2"))
            and all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
            and isinstance(mlp.norm, nn.Identity)
            and isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)
            and abs(attn.scale - attn.head_dim**-0.5) < 1e-12
            and attn.proj.bias is not None and mlp.fc1.bias is not None and mlp.fc2.bias is not None
        )
        if not plain:
            raise refuse(f"block {i} is not a plain pre-norm block (layer scale, QK norm, norm in MLP or other)")
        acts.add(_act_name(mlp.act))
        eps.update({blk.norm1.eps, blk.norm2.eps})
    if None in acts or len(acts) != 1:
        raise refuse(f"MLP activation {[type(b.mlp.act).__name__ for b in blocks]}")
    if pre_norm:
        eps.add(tower.norm_pre.eps)
    if len(eps) != 1:
        raise refuse(f"LayerNorms with different eps {sorted(eps)}")
    dim, heads = tower.embed_dim, blocks[0].attn.num_heads
    common = {
        "hidden_size": dim,
        "intermediate_size": blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": heads,
        "hidden_act": acts.pop(),
        "layer_norm_eps": eps.pop(),
        "image_size": int(patch.img_size[0]),
        "patch_size": int(patch.patch_size[0]),
        "num_channels": patch.proj.in_channels,
    }
    if patch.img_size[0] != patch.img_size[1] or patch.patch_size[0] != patch.patch_size[1]:
        raise refuse(f"non-square input {patch.img_size} or patch {patch.patch_size}")
    notes: list[str] = []
    sd: dict[str, Tensor] = {}
    d = {k: v.detach() for k, v in tower.state_dict().items()}
    qkv_bias = blocks[0].attn.qkv.bias is not None
    for i, _ in enumerate(blocks):
        w = d[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)
        b = d[f"blocks.{i}.attn.qkv.bias"].chunk(3) if qkv_bias else [torch.zeros(dim)] * 3
        sd.update({f"L{i}.q.weight": w[0], f"L{i}.k.weight": w[1], f"L{i}.v.weight": w[2]})
        sd.update({f"L{i}.q.bias": b[0], f"L{i}.k.bias": b[1], f"L{i}.v.bias": b[2]})
        for ours in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                sd[f"L{i}.{ours}.{p}"] = d[f"blocks.{i}.{ours}.{p}"]
    ones, zeros = torch.ones(dim), torch.zeros(dim)
    if not pre_norm:
        from transformers import ViTConfig

        config = ViTConfig(**common, qkv_bias=qkv_bias, pooler_output_size=dim)
        names = {"attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "q": "attention.q_proj", "k": "attention.k_proj",
                 "v": "attention.v_proj"}
        prefix = "layers"
        state = {
            "embeddings.cls_token": d["cls_token"],
            "embeddings.position_embeddings": d["pos_embed"],
            "embeddings.patch_embeddings.projection.weight": d["patch_embed.proj.weight"],
            "embeddings.patch_embeddings.projection.bias": d.get("patch_embed.proj.bias", zeros),
            # the final norm and the pooler sit after the feature layer: never read by Llava
            "layernorm.weight": ones, "layernorm.bias": zeros,
            "pooler.dense.weight": torch.zeros(dim, dim), "pooler.dense.bias": zeros,
        }
        notes.append("vision tower: timm ViT -> ViTModel; its final layernorm and pooler are unused placeholders")
    else:
        from transformers import CLIPVisionConfig

        if "patch_embed.proj.bias" in d:
            raise refuse("a pre-norm ViT whose patch embedding has a bias (CLIP's has none)")
        if not qkv_bias:
            notes.append("vision tower: q/k/v biases set to zero (the timm tower has none)")
        config = CLIPVisionConfig(**common)
        names = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                 "v": "self_attn.v_proj"}
        prefix = "encoder.layers"
        state = {
            "embeddings.class_embedding": d["cls_token"].reshape(dim),
            "embeddings.position_embedding.weight": d["pos_embed"].reshape(-1, dim),
            "embeddings.patch_embedding.weight": d["patch_embed.proj.weight"],
            "pre_layrnorm.weight": d["norm_pre.weight"], "pre_layrnorm.bias": d["norm_pre.bias"],
            "post_layernorm.weight": ones, "post_layernorm.bias": zeros,  # after the feature layer: unused
        }
        notes.append("vision tower: timm pre-norm ViT -> CLIPVisionModel; its post_layernorm is an unused placeholder")
    for key, value in sd.items():
        layer, rest = key[1:].split(".", 1)
        ours, p = rest.rsplit(".", 1)
        state[f"{prefix}.{layer}.{names[ours]}.{p}"] = value
    return config, state, notes


def _act_name(act: nn.Module) -> str | None:
    """The transformers ``hidden_act`` computing ``act`` exactly, or None."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    if name == "QuickGELU":
        return "quick_gelu"
    return None


def _llava_image_processor(
    encoder: VisualEncoder, preprocessing: dict | None
) -> tuple[LlavaImageProcessorPil, list[str]]:
    """The image processor preparing pixels as the training data did, and where it is not exact."""
    height, width = encoder.input_size
    mode = (preprocessing or {}).get("resize")
    size = (preprocessing or {}).get("image_size")
    notes = []
    common = {
        "resample": PILImageResampling.BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": encoder.mean.flatten().tolist(),
        "image_std": encoder.std.flatten().tolist(),
        "do_convert_rgb": True,
        "crop_size": {"height": height, "width": width},
    }
    if mode is None:
        notes.append("preprocessing: the model records none; images are squashed to the tower's input size")
    elif size is not None and (size, size) != (height, width):
        notes.append(
            f"preprocessing: training resized images to {size} px and the model resized them again to "
            f"{height}x{width}; the processor resizes once, straight to {height}x{width} (approximate)"
        )
    if mode == "center_crop" and height == width:
        notes.append(
            "preprocessing: center_crop was PIL ImageOps.fit (crop, then bicubic resize); the processor "
            "resizes the shorter side, then crops: exact for square images, sub-pixel differences otherwise"
        )
        return LlavaImageProcessorPil(
            **common, do_resize=True, size={"shortest_edge": height}, do_center_crop=True, do_pad=False
        ), notes
    if mode == "pad":
        notes.append(
            "preprocessing: pad letterboxed with black after resizing; the processor pads to square with "
            "the normalisation mean colour before resizing (Llava's pad_to_square): approximate"
        )
        return LlavaImageProcessorPil(
            **common, do_resize=True, size={"height": height, "width": width}, do_center_crop=False, do_pad=True
        ), notes
    if mode == "none":
        notes.append(
            "preprocessing: none kept the aspect ratio and the model squashed images to its input size "
            "(torch bicubic); the processor squashes with PIL bicubic: approximate"
        )
    return LlavaImageProcessorPil(
        **common, do_resize=True, size={"height": height, "width": width}, do_center_crop=False, do_pad=False
    ), notes


def llava_chat_template(bos: str) -> str:
    """A chat template rendering a conversation as the project's captioner prompt: every image
    placeholder of the user turns, then ``bos``, then the text of the user and assistant turns
    concatenated (no roles, no EOS; system turns dropped). It takes plain-string contents, where
    ``<image>`` followed by a newline or space marks an image (lmms-eval's llava_hf writes
    ``"<image>\\n" + question``), and lists of ``{"type": "image"}`` / ``{"type": "text"}`` parts
    (``processor.apply_chat_template``). A PRIOR LVLM is a pre-trained captioner: a question is
    a plain text prefix of the caption, as ``--model prior`` feeds it."""
    image, b = json.dumps(LLAVA_IMAGE_TOKEN), json.dumps(bos)
    return (
        "{%- set ns = namespace(images='', text='') -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['content'] is string -%}"
        f"{{%- set ns.images = ns.images + {image} * message['content'].count({image}) -%}}"
        f"{{%- set ns.text = ns.text + message['content'].replace({image} + '\\n', '').replace({image} + ' ', '')"
        f".replace({image}, '') -%}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{%- set ns.images = ns.images + {image} -%}}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
        f"{{{{- ns.images + {b} + ns.text -}}}}"
    )


def export_llava(lvlm: LVLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> dict[str, Any]:
    """Write ``lvlm`` (visual_encoder backbone) as ``LlavaForConditionalGeneration`` + ``LlavaProcessor``."""
    encoder: VisualEncoder = lvlm.backbone  # type: ignore[assignment]
    projector = encoder.projector
    if len(projector) != 3 or not isinstance(projector[1], nn.GELU) or projector[1].approximate != "none":
        raise UnmappableError(
            f"projector: projector_depth={(len(projector) + 1) // 2}, but LlavaMultiModalProjector is exactly "
            "linear-GELU-linear (projector_depth=2)"
        )
    vision_config, vision_state, notes = _vision_tower(encoder.vision)
    rows = lvlm.llm.get_input_embeddings().weight.shape[0]
    tok, (image_id,) = _with_tokens(tokenizer, [LLAVA_IMAGE_TOKEN], rows, out)
    text_config = _text_config(lvlm, rows + 1)
    tied = text_config.tie_word_embeddings = _tied(lvlm, notes)  # LlavaConfig takes the text config's
    num_tokens = encoder.num_tokens(*encoder.input_size)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=num_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(config).to(lvlm.llm.dtype).eval()
    model.model.vision_tower.load_state_dict(vision_state, strict=True)
    model.model.multi_modal_projector.load_state_dict(
        {f"linear_{j}.{p}": getattr(projector[i], p) for j, i in ((1, 0), (2, 2)) for p in ("weight", "bias")},
        strict=True,
    )
    new_row = lvlm.llm.get_input_embeddings().weight.new_zeros(1, text_config.hidden_size)
    _load_lm(lvlm, model.model.language_model, model.lm_head, new_row, tied)
    if tied:
        model.tie_weights()
    model.generation_config = _generation_config(lvlm, tok, [image_id])
    image_processor, pre_notes = _llava_image_processor(encoder, lvlm.preprocessing)
    bos = tok.convert_ids_to_tokens(lvlm.bos_token_id)
    tok.chat_template = llava_chat_template(bos)  # the tokenizer's too: lmms-eval's llava_hf reads that one
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _check_prompt(out, tokenizer, lvlm, num_tokens * [image_id], LLAVA_IMAGE_TOKEN + bos, encoder.input_size, "llava")
    if tok("a")["input_ids"] != tok("a", add_special_tokens=False)["input_ids"]:
        notes.append(
            "tokenizer: it adds special tokens unless told not to: call the processor with add_special_tokens=False "
            "(lmms-eval's llava_hf does not, so its prompts get them on top of the chat template's BOS)"
        )
    return {
        "kind": "llava",
        "model_class": "LlavaForConditionalGeneration",
        "prompt": LLAVA_IMAGE_TOKEN + bos + "{text}",
        "processor_kwargs": {"add_special_tokens": False},
        "chat_template": "the images of the user turns, BOS, then the text of the user and assistant turns "
        "(no roles, no EOS): the prompt above, for chat-template users such as lmms-eval's llava_hf",
        "image_token": LLAVA_IMAGE_TOKEN,
        "image_token_id": image_id,
        "num_image_tokens": num_tokens,
        "notes": notes + pre_notes + [_logit_note(rows, 1)],
    }


# --------------------------------------------------------------------------- Fuyu


def _fuyu_tokenizer(folder: Path, bos_token: str) -> None:
    """Make the saved tokenizer in ``folder`` produce, under FuyuProcessor, the project's layout.

    FuyuProcessor tokenizes ``<image placeholders>|NEWLINE|...<s>`` and drops its first id (the
    SentencePiece prefix of Fuyu's own tokenizer), writes BOS as the literal ``<s>`` and appends
    ``<0x04>`` to the prompt. A normaliser doubles a leading image token (the id it drops), maps
    ``<s>`` to this tokenizer's BOS and removes ``<0x04>``; none of those strings occur in a
    caption, which tokenizes as before (checked by :func:`_check_prompt`).
    """
    from tokenizers import Regex, normalizers

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnmappableError("tokenizer: FuyuProcessor needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(path.read_text())
    for entry in spec["added_tokens"]:
        if entry["content"] in (FUYU_IMAGE_TOKEN, FUYU_NEWLINE_TOKEN, bos_token):
            entry["normalized"] = True  # matched after the normaliser below
    steps = [
        normalizers.Replace(Regex(r"\A\|SPEAKER\|(?=[\s\S])"), FUYU_IMAGE_TOKEN * 2),
        normalizers.Replace(FUYU_ANSWER_STRING, ""),
    ]
    if bos_token != FUYU_BOS_STRING:
        steps.append(normalizers.Replace(FUYU_BOS_STRING, bos_token))
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(spec))
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)
    path.write_text(backend.to_str())


def _fuyu_image_processor(backbone: EncoderFree, preprocessing: dict | None) -> tuple[FuyuImageProcessorPil, list[str]]:
    """The Fuyu image processor: pixels to [-1, 1] (``x * 2 - 1`` = rescale 1/255, mean/std 0.5),
    images larger than the training size shrunk to fit it, partial patches padded mid-grey."""
    p = backbone.patch_size
    size = (preprocessing or {}).get("image_size")
    mode = (preprocessing or {}).get("resize")
    notes = [
        "preprocessing: partial patches are padded with raw value 127 (-0.004 after normalisation) "
        "where the model pads 0: exact for images whose sides are multiples of the patch size",
    ]
    if size is None:
        size = 1080  # FuyuImageProcessor's own default height; the model takes any size
        notes.append("preprocessing: the model records none; images larger than 1080 px are shrunk to fit")
    if mode in ("center_crop", "resize", "pad"):
        notes.append(
            f"preprocessing: training prepared {size}x{size} images ({mode}); FuyuImageProcessor only shrinks "
            f"images to fit {size}x{size} keeping their aspect: pass images already prepared to {size}x{size} "
            "(e.g. PIL.ImageOps.fit) for the exact training input"
        )
    elif mode == "none":
        notes.append(
            "preprocessing: none capped the longer side with PIL ImageOps.contain (rounded size); "
            "FuyuImageProcessor truncates the size: can differ by one pixel"
        )
    processor = FuyuImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        patch_size={"height": p, "width": p},
        resample=PILImageResampling.BICUBIC,
        do_pad=True,
        padding_value=127.5,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=0.5,
        image_std=0.5,
    )
    return processor, notes


def export_fuyu(lvlm: LVLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> dict[str, Any]:
    """Write ``lvlm`` (encoder_free backbone) as ``FuyuForCausalLM`` + ``FuyuProcessor``."""
    backbone: EncoderFree = lvlm.backbone  # type: ignore[assignment]
    p = backbone.patch_size
    rows = lvlm.llm.get_input_embeddings().weight.shape[0]
    tok, (image_id, newline_id) = _with_tokens(tokenizer, [FUYU_IMAGE_TOKEN, FUYU_NEWLINE_TOKEN], rows, out)
    bos = tok.convert_ids_to_tokens(lvlm.bos_token_id)
    _fuyu_tokenizer(out, bos)
    text_config = _text_config(lvlm, rows + 2)
    notes: list[str] = []
    tied = _tied(lvlm, notes)
    text_config.tie_word_embeddings = tied
    size = (lvlm.preprocessing or {}).get("image_size") or 1080
    config = FuyuConfig(
        text_config=text_config,
        image_size=size,
        patch_size=p,
        num_channels=3,
        image_token_id=image_id,
        tie_word_embeddings=tied,
        pad_token_id=special_ids(tokenizer)[2],
    )
    model = FuyuForCausalLM(config).to(lvlm.llm.dtype).eval()
    linear = backbone.projector.linear
    model.model.vision_embed_tokens.load_state_dict(linear.state_dict(), strict=True)
    sep = backbone.projector.row_sep.detach()
    new_rows = torch.stack([torch.zeros_like(sep), sep])  # |SPEAKER| (replaced by patches), |NEWLINE|
    _load_lm(lvlm, model.model.language_model, model.lm_head, new_rows, tied)
    if tied:
        model.tie_weights()
    model.generation_config = _generation_config(lvlm, tok, [image_id, newline_id])
    image_processor, pre_notes = _fuyu_image_processor(backbone, lvlm.preprocessing)
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    processor = FuyuProcessor(image_processor=image_processor, tokenizer=tok)
    processor.save_pretrained(out)
    probe = (size if lvlm.preprocessing else 4 * p,) * 2
    n_rows, n_cols = -(-probe[0] // p), -(-probe[1] // p)
    layout = ([image_id] * n_cols + [newline_id]) * n_rows
    _check_prompt(out, tokenizer, lvlm, layout, "", probe, "fuyu")
    return {
        "kind": "fuyu",
        "model_class": "FuyuForCausalLM",
        "prompt": "{text}",
        "processor_kwargs": {"return_legacy_image_output": False},
        "image_token": FUYU_IMAGE_TOKEN,
        "image_token_id": image_id,
        "image_newline_token": FUYU_NEWLINE_TOKEN,
        "image_newline_token_id": newline_id,
        "notes": [
            "row separator: the learned embedding is the |NEWLINE| row of the LM's embedding table",
            "tokenizer: a normaliser maps FuyuProcessor's literal <s> to the BOS token, drops its <0x04> "
            "answer marker and doubles a leading |SPEAKER| (the id FuyuProcessor strips)",
            *notes,
            *pre_notes,
            _logit_note(rows, 2),
        ],
    }


# --------------------------------------------------------------------------- checks


def _logit_note(rows: int, added: int) -> str:
    return (
        f"logits: columns 0..{rows - 1} are the project model's; the {added} added image token column(s) "
        f"from {rows} on are suppressed in generation (generation_config.suppress_tokens)"
    )


def _check_prompt(
    out: Path,
    tokenizer: PreTrainedTokenizerBase,
    lvlm: LVLM,
    image_ids: list[int],
    prefix: str,
    size: tuple[int, int],
    kind: str,
) -> None:
    """Raise unless the saved processor turns an image and a caption into the project's sequence
    ``[image tokens][BOS][caption ids]`` (and, for Llava, its chat template renders them as that prompt)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    caption = "a red circle, and 2 squares."
    expected = image_ids + encode_caption(tokenizer, caption)[:-1]
    kwargs = {"return_legacy_image_output": False} if kind == "fuyu" else {"add_special_tokens": False}
    image = Image.new("RGB", (size[1], size[0]), (120, 30, 200))
    got = processor(images=image, text=prefix + caption, return_tensors="pt", **kwargs)["input_ids"][0].tolist()
    if kind == "llava":  # the chat template renders an image and a caption as the same prompt
        chat = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": caption}]
        rendered = processor.apply_chat_template(chat, tokenize=False)
        if rendered != prefix + caption:
            raise RuntimeError(f"the export's chat template renders {rendered!r}, not {prefix + caption!r}")
    if got != expected:
        raise UnmappableError(
            f"processor: {type(processor).__name__} turns an image and a caption into ids {got[:8]}...{got[-8:]}, "
            f"not the project's [image tokens][BOS][caption] {expected[:8]}...{expected[-8:]}: this tokenizer "
            "cannot be driven by it"
        )


__all__ = ["EXPORT_FILE", "UnmappableError", "export_hf"]
