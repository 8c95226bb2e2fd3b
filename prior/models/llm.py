"""Any Hugging Face causal LM, built from a config (tests, demo) or loaded by name or path.

The ``llm`` config group holds exactly the keyword arguments of :func:`build_llm`::

    # a model built from a config, random init (tiny ones for tests and the demo)
    model_type: llama
    config: {hidden_size: 128, num_hidden_layers: 2, ...}

    # a pretrained model, by hub name or local folder (real runs, ``conf/llm/hf.yaml``);
    # `config` may then override fields that leave the weights' shapes alone (dropout, rope
    # scaling), and `model_type`, when given, must match the model's
    name_or_path: meta-llama/Llama-3.2-3B

    # a GGUF file (``conf/llm/smollm2.yaml``), dequantised to a plain trainable model at load
    name_or_path: /models/smollm2        # its folder (or null when gguf_file is a full path)
    gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf

A preset that gives both (``conf/llm/llama32_3b.yaml``) loads the pretrained model, and builds
the same architecture with random init and without any download when ``name_or_path`` is set
to null (meta-device shape checks, or training that LM from scratch). A pretrained load whose
``config`` would change a weight's shape (a tiny preset's ``hidden_size`` left in) is an error
that names the keys, not a shape mismatch deep inside transformers.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from prior.data.tokenization import special_ids

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llm_config(
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    model_type: str | None = None,
    config: dict[str, Any] | None = None,
    name_or_path: str | None = None,
    gguf_file: str | None = None,
) -> Any:
    """The transformers config of the LM the ``llm`` group describes (no weights loaded).

    Built from ``model_type``, the vocabulary size and the special ids come from ``tokenizer``
    unless ``config`` gives them; without a tokenizer ``config`` must give ``vocab_size``.
    Loaded (``name_or_path``, ``gguf_file``), ``config`` overrides fields of the model's own
    config, and may not change the shape of any weight.
    """
    config = dict(config or {})
    name_or_path, gguf_file = pretrained_source(name_or_path, gguf_file)
    if name_or_path is not None:
        where = name_or_path if gguf_file is None else f"{name_or_path}/{gguf_file}"
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        own = AutoConfig.from_pretrained(name_or_path, **extra)  # seconds for a GGUF file: read once
        unused = [k for k in config if not hasattr(own, k)]
        if unused:
            raise ValueError(
                f"llm.config keys {sorted(unused)} are not fields of {where!r}'s "
                f"{type(own).__name__}: fix or remove them."
            )
        cfg = copy.deepcopy(own)
        for key, value in config.items():
            setattr(cfg, key, value)
        if model_type is not None and cfg.model_type != model_type:
            raise ValueError(
                f"llm.model_type is {model_type!r} but {where!r} is a {cfg.model_type!r} "
                "model: set llm.model_type to match, or to null."
            )
        _check_same_shapes(own, cfg, config, where)
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


def pretrained_source(name_or_path: str | None, gguf_file: str | None) -> tuple[str | None, str | None]:
    """``(folder or hub name, GGUF file name in it)``; a full path in ``gguf_file`` gives both."""
    if gguf_file is None:
        return name_or_path, None
    path = Path(gguf_file)
    if name_or_path is None:
        if not path.is_absolute() and path.parent == Path("."):
            raise ValueError(
                f"llm.gguf_file={gguf_file!r} is a bare file name: set llm.name_or_path to its folder "
                "(or hub repo), or give gguf_file as a full path."
            )
        return str(path.parent), path.name
    if path.parent != Path("."):
        raise ValueError(
            f"llm.gguf_file={gguf_file!r} must be a file name inside llm.name_or_path={name_or_path!r} "
            "(or set name_or_path to null and give the full path)."
        )
    return name_or_path, gguf_file


def _check_same_shapes(own: Any, cfg: Any, overrides: dict[str, Any], where: str) -> None:
    """Raise, naming the keys, if the ``llm.config`` overrides change any weight's shape."""
    changed = {k: v for k, v in overrides.items() if getattr(own, k, None) != getattr(cfg, k, None)}
    if not changed:
        return

    def shapes(c: Any) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(c)
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    if shapes(own) != shapes(cfg):
        detail = ", ".join(f"{k}={v!r} (the model has {getattr(own, k, None)!r})" for k, v in changed.items())
        raise ValueError(
            f"llm.config sets {detail}, which changes the shape of {where!r}'s weights. A pretrained "
            "model keeps its sizes: drop these keys (a tiny preset's sizes are for building from "
            "scratch; load any pretrained model with `llm=hf llm.name_or_path=...`)."
        )


def build_llm(
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    model_type: str | None = None,
    config: dict[str, Any] | None = None,
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """Build (``model_type``) or load (``name_or_path`` and/or ``gguf_file``) a causal LM that
    fits ``tokenizer``.

    A GGUF file is dequantised to a plain model in ``dtype`` (trainable and savable, with no
    quantization left in its config). A model whose vocabulary is smaller than the tokenizer's
    gets its embeddings resized (logged), since the caption ids must all be valid rows.
    Building from a config honours an enclosing ``with torch.device("meta"):`` (shapes only,
    no memory). ``gradient_checkpointing`` trades compute for activation memory.
    """
    if dtype not in DTYPES:
        raise ValueError(f"llm.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name_or_path, gguf_file = pretrained_source(name_or_path, gguf_file)
    cfg = llm_config(tokenizer, model_type=model_type, config=config, name_or_path=name_or_path, gguf_file=gguf_file)
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    if name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=cfg, dtype=DTYPES[dtype], **kwargs)
        _drop_quantization(model)
        model.train()  # from_pretrained returns eval mode; a built model and a loaded one start alike
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype], **kwargs)
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > vocab:
        log.warning("Resizing %s embeddings from %d to %d rows to fit the tokenizer.", type(model).__name__, vocab, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _drop_quantization(model: PreTrainedModel) -> None:
    """A dequantised GGUF load is a plain model: forget the quantizer so it trains and saves."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def embedding_dim(model: PreTrainedModel) -> int:
    """Width of the LM's input embeddings."""
    emb: nn.Embedding = model.get_input_embeddings()
    return emb.weight.shape[1]
