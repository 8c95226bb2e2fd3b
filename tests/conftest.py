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


import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def compose_config(name: str, root: Path, overrides: list[str] = ()):  # noqa: ANN201
    """Compose one of the project's real root configs with every path under ``root``."""
    from prior.cli.common import compose_config as compose

    return compose(name, [f"paths.root_dir={root}", f"paths.output_dir={root}/runs/{name}", *overrides])


#: The tiny LM every pipeline test uses (the tiny_llama preset, narrowed to width 64).
TINY_LLM = ["llm.config.hidden_size=64", "llm.config.intermediate_size=128"]


@dataclass
class DemoArtifacts:
    root: Path
    data: Path
    tokenizer: Path
    reference: Path
    ref_metrics: dict


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoArtifacts:
    """The demo pipeline's stages 0-2 on a small corpus: shards, tokenizer, reference LM, weights."""
    from prior.cli.tokenizer import train_tokenizer
    from prior.cli.train_ref import train_reference
    from prior.cli.weights import compute_weights
    from prior.demo.corpus import CorpusConfig, generate_corpus

    root = tmp_path_factory.mktemp("demo")
    data = root / "data" / "demo"
    splits = {
        "train": {"num_samples": 3000, "num_shards": 4},
        "val": {"num_samples": 256, "num_shards": 2},
        "test": {"num_samples": 64, "num_shards": 2},
        "test_counter": {"num_samples": 64, "num_shards": 2},
    }
    generate_corpus(CorpusConfig(seed=0, splits=splits), data)
    train_tokenizer(str(data / "train"), str(data / "tokenizer"), vocab_size=512, min_frequency=2)
    ref_cfg = compose_config(
        "train_ref",
        root,
        [*TINY_LLM, "trainer.max_steps=300", "trainer.val_check_interval=150", "data.batch_size=32",
         "scheduler.num_warmup_steps=20", "optimizer.lr=3e-3", "logger=csv"],
    )
    metrics = train_reference(ref_cfg)
    compute_weights(compose_config("weights", root, ["num_workers=0"]))
    shutil.rmtree(root / "runs", ignore_errors=True)
    return DemoArtifacts(root, data, data / "tokenizer", Path(ref_cfg.export_dir), metrics)
