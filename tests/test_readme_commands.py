"""Every `prior-*` command the README and the experiment recipes show composes as typed.

The commands are read the way a shell would (``shlex``: quotes removed, line continuations
joined) and handed to Hydra's compose, so a brace pattern that reaches Hydra unquoted, a group or
key that does not exist, or a training command without a validation split fails here. No torch.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from prior.cli._hydra import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
#: Each console script and the root config it composes.
ENTRY_POINTS = {
    "prior-demo-data": "demo_data", "prior-tokenizer": "tokenizer", "prior-train-base": "train_base",
    "prior-train-vision": "train_vision", "prior-train-ref": "train_ref", "prior-weights": "weights",
    "prior-weights-report": "weights_report", "prior-train-lvlm": "train_lvlm", "prior-demo": "demo",
    "prior-eval": "eval",
}
#: Shell variables the README's blocks set before using them.
VARIABLES = {"$M": "Qwen/Qwen2.5-0.5B"}


def readme_commands() -> list[tuple[str, str]]:
    """(where, command line) for every command a user would copy: the lines of fenced bash
    blocks, inline `prior-...` spans without placeholders, and the recipes' comment lines."""
    found = []
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("prior-"):
                found.append(("README block", line.strip()))
    for span in re.findall(r"`(prior-[a-z-]+ [^`]*)`", text):
        if "<" not in span and "..." not in span:
            found.append(("README inline", span))
    for recipe in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        for line in recipe.read_text().splitlines():
            m = re.match(r"#\s+(prior-[a-z-]+\b.*)", line)
            if m:
                found.append((f"conf/experiment/{recipe.name}", m.group(1).strip()))
    return found


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's overrides with every sweep (``a=1,2``) replaced by its first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
            else o.input_line for o in parsed]


def as_typed(line: str) -> tuple[str, list[str]]:
    for name, value in VARIABLES.items():
        line = line.replace(name, value)
    argv = shlex.split(line, comments=True)
    config, overrides, args = ENTRY_POINTS[argv[0]], [], iter(argv[1:])
    for arg in args:
        if arg == "--config-name":
            config = next(args)
        elif not arg.startswith("-"):
            overrides.append(arg)
    return config, overrides


COMMANDS = readme_commands()


def test_the_readme_and_the_recipes_show_commands():
    where = {w for w, _ in COMMANDS}
    assert len(COMMANDS) > 30 and {"README block", "README inline"} <= where and len(where) > 3


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[line[:60] for _, line in COMMANDS])
def test_every_command_composes_as_typed(where, line):
    config, overrides = as_typed(line)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config, overrides=first_of_each_sweep(overrides))
    if config in ("train_ref", "train_lvlm"):
        shards = OmegaConf.to_container(cfg.data.shards, resolve=False)  # paths need a Hydra run to resolve
        assert shards["train"] != "???", f"{where}: `{line}` names no training shards"
        assert shards.get("val") not in (None, "???"), f"{where}: `{line}` trains without a validation split"


def test_the_data_follows_the_backbones_image_size():
    """data=img2dataset resizes to the input size the backbone names (CLIP ViT-L/14-336: 336),
    224 for a backbone that names none, and an explicit data.image_size wins."""
    def image_size(*overrides: str) -> int:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("train_lvlm", ["data=img2dataset", *overrides]).data.image_size

    assert image_size("backbone=clip_vit_l_336") == 336
    assert image_size("backbone=visual_encoder") == 224
    assert image_size("backbone=clip_vit_l_336", "data.image_size=448") == 448
