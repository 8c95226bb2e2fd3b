"""The paper's regimes at demo scale: base corpus, base LM, vision tower, reference from the base,
and the demo_h / demo_u recipes that build on them (each stage a few steps from its real config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import prior

from prior.cli.common import build_datamodule
from prior.cli.demo_data import generate_from_config
from prior.cli.train_base import train_base
from prior.cli.train_lvlm import train_lvlm
from prior.cli.train_ref import train_reference
from prior.cli.train_vision import train_vision
from prior.demo.corpus import SCENE_OPEN
from prior.data.tokenization import fingerprint, load_tokenizer
from tests.conftest import TINY_LLM, compose_config

FEW = ["logger=csv", "trainer.limit_val_batches=1", "data.batch_size=16", "scheduler.num_warmup_steps=1"]


@dataclass
class Parts:
    base: Path
    vision: Path
    reference: Path


@pytest.fixture(scope="module")
def parts(demo) -> Parts:
    """Base corpus, base LM, vision tower and the reference fine-tuned from the base, each a few
    steps, on the session's demo corpus folder."""
    generate_from_config(compose_config("demo_base_data", demo.root, ["corpus=tiny", "corpus.num_workers=1"]))
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=4"]
    base_cfg = compose_config("train_base", demo.root, [*FEW, *TINY_LLM, *steps])
    reading = train_base(base_cfg)
    assert reading["scene_reading/probes"] > 0
    assert 0 < reading["scene_reading/with_scene"] < 1 and 0 < reading["scene_reading/without_scene"] < 1
    vision_cfg = compose_config("train_vision", demo.root, [*FEW, *steps])
    train_vision(vision_cfg)
    ref_cfg = compose_config(
        "train_ref_base", demo.root, [*FEW, *steps, "export_dir=${paths.artifacts_dir}/demo/reference_from_base"]
    )
    train_reference(ref_cfg)
    return Parts(Path(base_cfg.export_dir), Path(vision_cfg.export_dir), Path(ref_cfg.export_dir))


def test_scene_reading_prompts_stop_before_each_counter_prior_colour():
    from prior.demo.probes import _prompts

    objects = [
        {"shape": "circle", "color": "green", "size": "large", "position": "left", "counter_prior": True},
        {"shape": "square", "color": "blue", "size": "small", "position": "right", "counter_prior": False},
        {"shape": "star", "color": "red", "size": "small", "position": "middle", "counter_prior": True},
    ]
    assert _prompts({"objects": objects}) == [
        ("three shapes: a large circle in", "green"),
        ("three shapes: a large circle in green on the left, a small star in", "red"),
    ]


def test_base_corpus_is_disjoint_and_carries_verbal_scenes(demo, parts):
    manifest = json.loads((demo.root / "data" / "demo_base" / "train" / "manifest.json").read_text())
    lvlm = json.loads((demo.data / "train" / "manifest.json").read_text())
    assert manifest["seed"] != lvlm["seed"] and manifest["config"]["scene_prefix_p"] == 0.5
    assert not (demo.root / "data" / "demo_base" / "test").exists()
    import tarfile

    with tarfile.open(demo.root / "data" / "demo_base" / "train" / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    with_scene = [m for m in metas if m["caption"].startswith(SCENE_OPEN)]
    assert 0.2 < len(with_scene) / len(metas) < 0.8
    for m in with_scene:  # spans still cover the caption exactly, the scene included
        assert all(m["caption"][s["start"] : s["end"]] == s["text"] for s in m["spans"])
        assert {s["cls"] for s in m["spans"] if s["start"] == 0} == {"scene"}
        for obj in m["objects"]:
            assert f"{obj['size']} {obj['shape']} {obj['color']} {obj['position']}" in m["caption"]


def test_base_lm_and_reference_export_hugging_face_folders(demo, parts):
    base = AutoModelForCausalLM.from_pretrained(parts.base)
    reference = AutoModelForCausalLM.from_pretrained(parts.reference)
    assert base.config.hidden_size == 64  # the tiny base, not the preset's width: stage 1 loaded it
    assert reference.config.to_dict()["hidden_size"] == 64
    assert fingerprint(load_tokenizer(parts.reference)) == fingerprint(load_tokenizer(demo.tokenizer))
    moved = [not torch.equal(p, q) for p, q in zip(base.parameters(), reference.parameters(), strict=True)]
    assert any(moved)  # fine-tuned, starting from the base


def test_vision_tower_exports_a_timm_folder(parts):
    tower = timm.create_model(f"local-dir:{parts.vision}", pretrained=True, num_classes=0)
    saved = load_file(parts.vision / "model.safetensors")
    assert not any(k.startswith("head") for k in saved)
    for name, tensor in tower.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_demo_h_trains_only_the_projector_and_leaves_frozen_parts_bit_identical(demo, parts):
    cfg = compose_config(
        "train_lvlm", demo.root,
        ["experiment=demo_h", "loss=prior", *FEW, "trainer.max_steps=3", "trainer.val_check_interval=3",
         "~callbacks.periodic_eval", "callbacks.weight_histogram=null"],
    )  # fmt: skip
    module = instantiate(cfg.model, _recursive_=False)
    lvlm = module.model
    tower = timm.create_model(f"local-dir:{parts.vision}", pretrained=True, num_classes=0)
    base = AutoModelForCausalLM.from_pretrained(parts.base)
    assert torch.equal(lvlm.llm.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(lvlm.backbone.vision.patch_embed.proj.weight, tower.patch_embed.proj.weight)
    trainable = {n.split(".")[1] for n, p in lvlm.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    frozen = {"llm": _state(lvlm.llm), "vision": _state(lvlm.backbone.vision)}
    projector = _state(lvlm.backbone.projector)

    from prior.cli.common import build_trainer

    datamodule = build_datamodule(cfg)
    build_trainer(cfg).fit(module, datamodule=datamodule)
    for name, before in frozen.items():
        after = _state(getattr(lvlm, name) if name == "llm" else lvlm.backbone.vision)
        assert all(torch.equal(before[k], after[k]) for k in before), name
    assert all(p.grad is None for n, p in lvlm.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(v, lvlm.backbone.projector.state_dict()[k]) for k, v in projector.items())


def test_demo_u_starts_from_the_base_lm_and_trains_it(demo, parts):
    cfg = compose_config(
        "train_lvlm", demo.root,
        ["experiment=demo_u", "loss=ntp", *FEW, "trainer.max_steps=2", "trainer.val_check_interval=2",
         "~callbacks.periodic_eval", "callbacks.weight_histogram=null"],
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(parts.base)
    module = instantiate(cfg.model, _recursive_=False)
    assert all(torch.equal(p, q) for p, q in zip(module.model.llm.parameters(), base.parameters(), strict=True))
    assert all(p.requires_grad for p in module.model.parameters())
    assert "val/ntp_loss" in train_lvlm(cfg)
    lvlm, _ = prior.load(cfg.export_dir)
    assert any(not torch.equal(p, q) for p, q in zip(lvlm.llm.parameters(), base.parameters(), strict=True))
