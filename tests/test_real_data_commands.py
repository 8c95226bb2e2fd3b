"""The README's real-data block runs as typed, through the console scripts' own entry points, on a
folder of img2dataset shards that the test writes.

Only what cannot run here is swapped, and every swap is listed in ``SWAPS``: the hub LLM's name
becomes a tiny Llama saved by the test (with its own tokenizer, as a hub model has), CLIP
ViT-L/14-336 becomes the tiny ViT, the GPU the CPU, and the runs are cut to a few steps
(``TINY``). The recipe, the shard layout, the paths between stages and every other override are
the README's.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_img2dataset_shards
from tests.test_readme_commands import ENTRY_POINTS, assignment

ROOT = Path(__file__).resolve().parents[1]
#: The README's stand-ins for a real run, and what replaces them here.
SWAPS = {"/data/cc3m": "{shards}", "Qwen/Qwen2.5-0.5B": "{llm}", "backbone=clip_vit_l_336": "backbone=visual_encoder",
         "trainer=gpu": "trainer=cpu"}
#: Appended per root config: a few steps on 2 cores, batches in the main process, CSV logs.
FEW = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.batch_size=8", "data.eval_batch_size=8",
       "data.num_workers=0", "data.shuffle_buffer=16", "logger=csv", "callbacks.sample_table=null"]
TINY = {"train_ref": FEW, "train_lvlm": FEW, "weights": ["num_workers=0", "micro_batch_size=16"],
        "weights_report": ["limit=32", "html_examples=4"]}


def real_data_block() -> list[str]:
    """The command lines of the README's first bash block under "Real data and real models",
    with its shell variables expanded."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Real data and real models"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    variables = dict(found for found in map(assignment, lines) if found)
    commands = [line for line in lines if line.startswith("prior-")]
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        commands = [c.replace(f"${name}", value) for c in commands]
    return commands


def tiny_hub_llm(folder: Path, captions: list[str]) -> Path:
    """A tiny Llama saved with its own byte-level BPE tokenizer, laid out as a hub model is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prior.data.tokenization import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(captions, vocab_size=300, min_frequency=1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_as_typed(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one command line through its console script's entry point (as the shell would call it)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    argv = shlex.split(line, comments=True)
    config = ENTRY_POINTS[argv[0]]
    module, func = scripts[argv[0]].split(":")
    monkeypatch.setattr(sys, "argv", [argv[0], *argv[1:], *TINY.get(config, [])])
    getattr(import_module(module), func)()


def test_the_readme_real_data_block_runs_as_typed_on_img2dataset_shards(tmp_path, monkeypatch):
    from prior import load
    from prior.data.sidecars import sidecar_path

    shards = tmp_path / "cc3m"
    write_img2dataset_shards(shards / "train", 2, 24)
    write_img2dataset_shards(shards / "val", 2, 8, first_shard=2)
    words = "a circle in red on the left and a square in blue on the right".split()
    llm = tiny_hub_llm(tmp_path / "hub" / "tiny-llm", [" ".join(words[: 3 + i % 9]) for i in range(64)])

    commands = real_data_block()
    assert [c.split()[0] for c in commands] == [
        "prior-train-ref", "prior-weights", "prior-weights-report", "prior-train-lvlm"]
    assert all("recipe=img2dataset" in c for c in commands)  # one recipe drives every stage
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths (artifacts/, logs/) start where the command runs
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    for line in commands:
        for stand_in, here in SWAPS.items():
            line = line.replace(stand_in, here.format(shards=shards, llm=llm))
        run_as_typed(line, monkeypatch)

    # stage 1 exported the reference where the recipe says; stage 2 wrote a sidecar beside every shard
    reference = work / "artifacts" / "img2dataset" / "reference"
    assert (reference / "config.json").exists()
    for tar in [*sorted((shards / "train").glob("*.tar")), *sorted((shards / "val").glob("*.tar"))]:
        sidecar = np.load(sidecar_path(str(tar), None), allow_pickle=False)
        assert len(sidecar.files) > 0
    assert (work / "artifacts" / "img2dataset" / "token_weights.html").exists()
    # stage 3 trained on the same shards with the LLM's tokenizer and exported a loadable LVLM
    model, tokenizer = load(work / "artifacts" / "img2dataset" / "lvlm")
    assert len(tokenizer) == len(load_tokenizer_of(llm))
    assert model.preprocessing["image_size"] == 32


def load_tokenizer_of(folder: Path):  # noqa: ANN201
    from prior.data.tokenization import load_tokenizer

    return load_tokenizer(folder)
