"""Every `prior-*` command the README, the experiments and the recipes show composes as typed.

The commands are read the way a shell would (``shlex``: quotes removed, line continuations
joined, ``$VAR`` replaced by the value the same text assigns it) and handed to Hydra's compose,
so a brace pattern that reaches Hydra unquoted, a group or key that does not exist, a mandatory
value left out (a recipe's ``root``) or a training command without a validation split fails here.
No torch.
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
    "prior-eval": "eval", "prior-export": "export",
}
#: Shell variables the README's blocks and the recipes' comments set (``R="..."``) before using them.
VARIABLES: dict[str, str] = {}
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


def assignment(line: str) -> tuple[str, str] | None:
    """(name, value) of a shell assignment line (``R="recipe=... recipe.root=..."``), else None."""
    m = ASSIGNMENT.match(line)
    return (m.group(1), " ".join(shlex.split(m.group(2), comments=True))) if m else None


def _assigns(line: str) -> bool:
    """Record a shell assignment in ``VARIABLES``; True when the line is one."""
    found = assignment(line)
    if found:
        VARIABLES[found[0]] = found[1]
    return bool(found)


def readme_commands() -> list[tuple[str, str]]:
    """(where, command line) for every command a user would copy: the lines of fenced bash
    blocks, inline `prior-...` spans without placeholders, and the comment lines of the
    experiment and recipe configs."""
    found = []
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not _assigns(line.strip()) and line.strip().startswith("prior-"):
                found.append(("README block", line.strip()))
    for span in re.findall(r"`(prior-[a-z-]+ [^`]*)`", text):
        if "<" not in span and "..." not in span:
            found.append(("README inline", span))
    for config in sorted([*(ROOT / "conf" / "experiment").glob("*.yaml"), *(ROOT / "conf" / "recipe").glob("*.yaml")]):
        for line in config.read_text().splitlines():
            m = re.match(r"#\s+(.*)", line)
            if m and not _assigns(m.group(1).strip()) and re.match(r"prior-[a-z-]+\b", m.group(1)):
                found.append((f"conf/{config.parent.name}/{config.name}", m.group(1).strip()))
    return found


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's overrides with every sweep (``a=1,2``) replaced by its first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
            else o.input_line for o in parsed]


def as_typed(line: str) -> tuple[str, list[str]]:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        line = line.replace(f"${name}", value)
    assert "$" not in line.replace("${", ""), f"`{line}` uses a shell variable nothing assigns"
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
    paths = ["paths.root_dir=/run", "paths.output_dir=/run/out"]  # what a Hydra run sets
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config, overrides=[*first_of_each_sweep(overrides), *paths])
    recipe = cfg.get("recipe")
    if recipe is not None:
        try:  # every value the stages read from the recipe resolves: nothing mandatory left out
            OmegaConf.to_container(recipe, resolve=True, throw_on_missing=True)
        except Exception as err:
            pytest.fail(f"{where}: `{line}` leaves its recipe incomplete: {err}")
    if config in ("train_ref", "train_lvlm"):
        shards = OmegaConf.to_container(cfg.data.shards, resolve=True)
        assert shards["train"], f"{where}: `{line}` names no training shards"
        assert shards.get("val"), f"{where}: `{line}` trains without a validation split"


def test_the_data_follows_the_backbones_image_size():
    """recipe=img2dataset resizes to the input size the backbone names (CLIP ViT-L/14-336: 336),
    224 for a backbone that names none, and an explicit recipe.image_size or data.image_size wins."""
    def image_size(*overrides: str) -> int:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("train_lvlm", ["recipe=img2dataset", "recipe.root=/d", *overrides]).data.image_size

    assert image_size("backbone=clip_vit_l_336") == 336
    assert image_size("backbone=visual_encoder") == 32   # the tiny tower's own
    assert image_size("backbone=encoder_free") == 224  # any size: the recipe's default
    assert image_size("backbone=clip_vit_l_336", "recipe.image_size=448") == 448
    assert image_size("backbone=clip_vit_l_336", "data.image_size=448") == 448


STAGES = ("train_ref", "weights", "weights_report", "train_lvlm", "eval", "tokenizer")


@pytest.mark.parametrize("recipe", ["demo", "smollm2", "img2dataset"])
def test_one_recipe_gives_every_stage_the_same_data(recipe):
    """Shards, tokenizer, caption length and the reference folder come from the recipe alone:
    stage 1 exports the reference where stages 2, 3 (online) and the report read it, stage 2
    scores the splits stage 3 trains and validates on, and every stage tokenizes to one length."""
    overrides = [f"recipe={recipe}", "recipe.root=/corpus", "paths.root_dir=/run", "paths.output_dir=/run/out",
                 "llm=hf", "llm.name_or_path=/models/llm"]
    cfgs = {}
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for stage in STAGES:
            extra = ["model=x"] if stage == "eval" else []
            drop = () if stage in ("train_ref", "train_lvlm") else ("llm=hf", "llm.name_or_path=/models/llm")
            stage_overrides = [o for o in overrides if o not in drop]
            if stage == "train_lvlm":
                stage_overrides.append("loss=prior_online")
            cfgs[stage] = OmegaConf.to_container(compose(stage, [*stage_overrides, *extra]), resolve=True)
    ref, lvlm = cfgs["train_ref"], cfgs["train_lvlm"]
    assert ref["export_dir"] == cfgs["weights"]["reference"] == lvlm["loss"]["reference"]
    assert ref["export_dir"] == cfgs["weights_report"]["tokenizer"]
    assert cfgs["weights"]["shards"] == [lvlm["data"]["shards"]["train"], lvlm["data"]["shards"]["val"]]
    assert ref["data"]["shards"] == lvlm["data"]["shards"]
    assert cfgs["weights_report"]["shards"] == lvlm["data"]["shards"]["val"]
    assert lvlm["data"]["shards"]["train"].startswith("/corpus")
    assert ref["data"]["tokenizer"] == lvlm["data"]["tokenizer"]
    lengths = {ref["data"]["max_length"], lvlm["data"]["max_length"], cfgs["weights"]["max_length"],
               cfgs["weights_report"]["max_length"], cfgs["eval"]["max_length"]}
    assert len(lengths) == 1
    if recipe == "img2dataset":
        assert lvlm["data"]["tokenizer"] == "/models/llm"  # the LLM's own
    else:
        assert cfgs["tokenizer"]["out_dir"] == lvlm["data"]["tokenizer"] or recipe == "smollm2"
