"""Distributed strategies the trainer configs build: FSDP that wraps and checkpoints by layer.

``conf/trainer/fsdp.yaml`` builds ``fsdp_strategy``: every module whose class name matches one of
``wrap_layers`` (glob patterns; ``*DecoderLayer`` covers Llama, Mistral, Qwen2 and most Hugging
Face decoders, ``Block`` timm's ViT blocks) is its own FSDP unit, and, with
``activation_checkpointing``, its activations are recomputed in the backward pass. Policies are
picklable (``functools.partial`` of a module-level function), so they also travel to spawned ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from functools import partial
from typing import Any

from torch import nn

DEFAULT_WRAP_LAYERS = ("*DecoderLayer", "Block")


def _matches(module: nn.Module, recurse: bool = False, nonwrapped_numel: int = 0, *,
             patterns: tuple[str, ...]) -> bool:
    """An FSDP auto-wrap policy: always descend; wrap a module whose class name matches."""
    return True if recurse else any(fnmatch(type(module).__name__, p) for p in patterns)


def layer_policy(patterns: Sequence[str] = DEFAULT_WRAP_LAYERS) -> Any:
    """The auto-wrap (and activation-checkpointing) policy for layers named by ``patterns``."""
    return partial(_matches, patterns=tuple(patterns))


def fsdp_strategy(wrap_layers: Sequence[str] = DEFAULT_WRAP_LAYERS, activation_checkpointing: bool = False,
                  **kwargs: Any) -> Any:
    """Lightning's FSDPStrategy wrapping each matching layer (and checkpointing its activations
    when asked); ``kwargs`` go to FSDPStrategy (sharding_strategy, state_dict_type, ...)."""
    from lightning.pytorch.strategies import FSDPStrategy

    policy = layer_policy(wrap_layers)
    return FSDPStrategy(auto_wrap_policy=policy,
                        activation_checkpointing_policy=policy if activation_checkpointing else None, **kwargs)


def is_sharded(strategy: Any) -> bool:
    """Whether parameters are sharded over ranks (so every rank must join a forward or a gather)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def full_state_dict(strategy: Any) -> dict[str, Any]:
    """The LightningModule's whole state dict, gathered to rank 0 under FSDP (call on every rank;
    the other ranks get an empty dict), or its plain state dict otherwise."""
    if not is_sharded(strategy):
        return strategy.lightning_module.state_dict()
    saved, strategy._state_dict_type = strategy._state_dict_type, "full"
    try:
        return strategy.lightning_module_state_dict()
    finally:
        strategy._state_dict_type = saved


@contextlib.contextmanager
def root_params_gathered(strategy: Any) -> Iterator[None]:
    """Run the LightningModule's submodules outside the training forward (generation in a callback):
    under FSDP the root unit's own parameters (embeddings, projector, head) are gathered for the
    block, and the wrapped layers gather theirs in their forward as usual. Every rank must enter
    it. A no-op for unsharded strategies."""
    if not is_sharded(strategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(strategy.model, recurse=False, writeback=False):
        yield


def local_values(tensor: Any) -> list[Any]:
    """The values this rank holds of a state-dict entry: a sharded checkpoint's ShardedTensor or
    DTensor gives its local shards, a plain tensor itself."""
    if hasattr(tensor, "local_shards"):
        return [shard.tensor for shard in tensor.local_shards()]
    if hasattr(tensor, "to_local"):
        return [tensor.to_local()]
    return [tensor]
