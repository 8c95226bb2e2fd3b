"""Shared fixtures: an isolated environment for every test session."""

from __future__ import annotations

import os
import tempfile

# wandb and Hydra must never write outside a temporary folder during tests.
_TMP = tempfile.mkdtemp(prefix="prior-tests-")
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ[_var] = os.path.join(_TMP, _var.lower())
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
