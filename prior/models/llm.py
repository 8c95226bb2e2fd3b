"""Any Hugging Face causal LM, built from a config (tests, demo) or loaded by name or path.

The ``llm`` config group holds exactly the keyword arguments of :func:`build_llm`::

    # a model built from a config, random init (tiny ones for tests and the demo)
    model_type: llama
    config: {hidden_size: 128, num_hidden_layers: 2, ...}

    # a pretrained model, by hub name or local folder (real runs); `config` then overrides
    # fields of its config, and `model_type`, when given, must match it
    name_or_path: meta-llama/Llama-3.2-3B

A preset that gives both (``conf/llm/llama32_3b.yaml``) loads the pretrained model, and builds
the same architecture with random init and without any download when ``name_or_path`` is set
to null (meta-device shape checks, or training that LM from scratch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from prior.data.tokenization import special_ids

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llm_config(
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    model_type: str | None = None,
    config: dict[str, Any] | None = None,
    name_or_path: str | None = None,
) -> Any:
    """The transformers config of the LM the ``llm`` group describes (no weights loaded).

    Built from ``model_type``, the vocabulary size and the special ids come from ``tokenizer``
    unless ``config`` gives them; without a tokenizer ``config`` must give ``vocab_size``.
    """
    config = dict(config or {})
    if name_or_path is not None:
        cfg, unused = AutoConfig.from_pretrained(name_or_path, return_unused_kwargs=True, **config)
        if unused:
            raise ValueError(
                f"llm.config keys {sorted(unused)} are not fields of {name_or_path!r}'s "
                f"{type(cfg).__name__}: fix or remove them."
            )
        if model_type is not None and cfg.model_type != model_type:
            raise ValueError(
                f"llm.model_type is {model_type!r} but {name_or_path!r} is a {cfg.model_type!r} "
                "model: set llm.model_type to match, or to null."
            )
        return cfg
    if model_type is None:
        raise ValueError(
            "The llm config needs `model_type` (build from `config`) or `name_or_path` "
            "(a pretrained model by hub name or local folder)."
        )
    defaults: dict[str, Any] = {}
    if tokenizer is not None:
        bos, eos, pad = special_ids(tokenizer)
        defaults = {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    elif "vocab_size" not in config:
        raise ValueError("Without a tokenizer, llm.config must give `vocab_size`.")
    return AutoConfig.for_model(model_type, **{**defaults, **config})


def build_llm(
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    model_type: str | None = None,
    config: dict[str, Any] | None = None,
    name_or_path: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build (``model_type``) or load (``name_or_path``) a causal LM that fits ``tokenizer``.

    A model whose vocabulary is smaller than the tokenizer's gets its embeddings resized
    (logged), since the caption ids must all be valid rows. Building from a config honours an
    enclosing ``with torch.device("meta"):`` (shapes only, no memory).
    """
    if dtype not in DTYPES:
        raise ValueError(f"llm.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = llm_config(tokenizer, model_type=model_type, config=config, name_or_path=name_or_path)
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=cfg, dtype=DTYPES[dtype], **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype], **kwargs)
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > vocab:
        log.warning("Resizing %s embeddings from %d to %d rows to fit the tokenizer.", type(model).__name__, vocab, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return model


def embedding_dim(model: PreTrainedModel) -> int:
    """Width of the LM's input embeddings."""
    emb: nn.Embedding = model.get_input_embeddings()
    return emb.weight.shape[1]
